"""`make gpu-check`: the GPU validation run, in stages that each stream their results.

    python scripts/gpu_check.py OUT [--dry-run] [--budget SECONDS]

Called by scripts/gpu_check.sh (see its header for the budget of each stage).  Every
stage has its own timeout (cut to what is left of the whole budget), runs in its own
process group (a timeout kills all of it), and when it ends -- passed, failed, timed
out or skipped -- OUT/summary.md is rewritten and OUT/gpu_check.tgz refreshed with
every log, junit file, CSV and chart so far.  OUT never holds more than three files
(summary.md, summary.json, gpu_check.tgz): the device tool brings back at most 8.

Stages: env, build, smoke, cpp_tests, triton_tests, bench_ops, bench_meta.  A failed
build skips only what needs the extension (the cpp tests, the op benchmark, the cpp
half of the meta-iteration benchmark); the Triton stages still run.  GPU tests are
selected by the ``gpu`` marker (``-m gpu``), split into cpp and Triton by ``-k triton``,
so they are found wherever they live under tests/.

Triton compile work is bounded: REPTILE_FUSED_TRITON_TUNE=quick (two autotune
configurations), one cold TRITON_CACHE_DIR for the whole run, and each stage's new
compiles are counted (cubins added to that cache) into the summary.

``--dry-run`` runs the same machinery on a machine without a GPU, as `make test` does
(tests/gpu_ready/test_gpu_check.py): no build, the pytest stages on one small file (the
GPU tests skip), the smoke stage on CPU at tiny sizes, the benchmark stages replaced by
stand-ins of a few seconds.  GPU_CHECK_DRY_TIMEOUT_STAGE=<stage> makes that stage time
out and GPU_CHECK_DRY_BUILD_FAILS=1 simulates a failed build, so the test exercises
the timeout and skip paths too.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LOG_BYTES = 4 << 20  # each log is cut to its last 4 MiB in the archive


@dataclass
class Stage:
    name: str
    expected_s: int
    timeout_s: int
    needs_ext: bool = False
    status: str = "pending"  # passed / failed / timed out / skipped
    seconds: float = 0.0
    detail: str = ""
    compiles: int | None = None
    headline: list[str] = field(default_factory=list)


class Check:
    def __init__(self, out: Path, work: Path, dry: bool, budget: float, py: str):
        self.out, self.work, self.dry, self.py = out, work, dry, py
        self.deadline = time.monotonic() + budget
        self.started = dt.datetime.now(dt.timezone.utc)
        self.stages: list[Stage] = []
        self.ext_ok = True
        self.env_lines: list[str] = []
        self.triton_cache = work / "triton-cache"
        self.env = dict(os.environ)
        self.env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=f"{ROOT}{os.pathsep + os.environ['PYTHONPATH'] if os.environ.get('PYTHONPATH') else ''}",
            TRITON_CACHE_DIR=str(self.triton_cache),
            REPTILE_FUSED_TRITON_TUNE="quick",
        )

    # ------------------------------------------------------------ running

    def left(self, at_most: float) -> float:
        """Seconds a helper command may take: at most ``at_most``, never past the budget."""
        return max(1.0, min(at_most, self.deadline - time.monotonic()))

    def cubins(self) -> int:
        return sum(1 for _ in self.triton_cache.rglob("*.cubin")) if self.triton_cache.exists() else 0

    def run(self, stage: Stage, cmds: list[list[str]], log: Path, env=None) -> str:
        """Run ``cmds`` concurrently (each in its own process group) under the stage's
        timeout; returns passed / failed / timed out."""
        limit = min(stage.timeout_s, self.deadline - time.monotonic())
        if limit <= 1:
            return "timed out"
        procs = []
        logs = []
        for i, cmd in enumerate(cmds):
            path = log if len(cmds) == 1 else log.with_name(f"{log.stem}.{i}{log.suffix}")
            f = open(path, "w")
            f.write(f"# command: {json.dumps(cmd)}\n")
            f.flush()
            logs.append(f)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
        end = time.monotonic() + limit
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
        for f in logs:
            f.close()
        if timed_out:
            return "timed out"
        return "passed" if all(p.returncode == 0 for p in procs) else "failed"

    def stage(self, stage: Stage, body) -> None:
        self.stages.append(stage)
        if stage.needs_ext and not self.ext_ok:
            stage.status, stage.detail = "skipped", "the extension did not build"
        elif self.deadline - time.monotonic() <= 1:
            stage.status, stage.detail = "skipped", "no time left in the budget"
        else:
            before = self.cubins()
            start = time.monotonic()
            try:
                stage.status = body(stage)
            except Exception as exc:  # noqa: BLE001 - a broken stage must not lose the others
                stage.status, stage.detail = "failed", f"{type(exc).__name__}: {exc}"
            stage.seconds = round(time.monotonic() - start, 1)
            stage.compiles = self.cubins() - before
        print(f"gpu_check: {stage.name}: {stage.status} in {stage.seconds} s {stage.detail}", flush=True)
        self.publish()

    # ------------------------------------------------------------ stages

    def s_env(self, st: Stage) -> str:
        code = (
            "import platform, torch\n"
            "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)\n"
            "try:\n import triton; print('triton', triton.__version__)\nexcept Exception as e: print('triton: not importable', e)\n"
            "if torch.cuda.is_available():\n"
            " p = torch.cuda.get_device_properties(0)\n"
            " print('gpu', torch.cuda.get_device_name(), 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs',"
            " round(p.total_memory / 2**30, 1), 'GiB', torch.cuda.device_count(), 'device(s)')\n"
            "else:\n print('gpu: none visible')\n"
        )
        status = self.run(st, [[self.py, "-c", code]], self.work / "env.txt")
        self.env_lines = [line for line in (self.work / "env.txt").read_text().splitlines()[1:] if line.strip()]
        st.headline = self.env_lines[:3]
        return status

    def s_build(self, st: Stage) -> str:
        if self.dry:
            if os.environ.get("GPU_CHECK_DRY_BUILD_FAILS") == "1":  # exercises the skip path
                (self.work / "build.log").write_text("dry run: a failed build, on purpose\n")
                st.detail = "dry run: build failure simulated"
                self.ext_ok = False
                return "failed"
            st.detail = "dry run: not built (the installed extension is used)"
            return "skipped"
        env = dict(self.env)
        if not env.get("TORCH_CUDA_ARCH_LIST"):
            arch = subprocess.run([self.py, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
                                  capture_output=True, text=True, env=env).stdout.strip()  # fmt: skip
            env["TORCH_CUDA_ARCH_LIST"] = arch or "9.0"
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        env["REPTILE_FUSED_CUDA"] = "1"
        if not env.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
        st.detail = f"arch {env['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS {env['MAX_JOBS']}"
        status = self.run(st, [[self.py, "setup.py", "build_ext", "--inplace"]], self.work / "build.log", env=env)
        self.ext_ok = status == "passed"
        if self.ext_ok:  # the resource report of the fresh build: registers, no stack, no spills
            rep = subprocess.run([self.py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                  "tests/gpu_ready/test_cuda_build.py"], cwd=ROOT, env=self.env,
                                 capture_output=True, text=True, timeout=self.left(120))  # fmt: skip
            (self.work / "build_resources.log").write_text(rep.stdout + rep.stderr)
            regs = re.findall(r"sm_\d+\w*: \d+ kernels, registers \S+", rep.stdout)
            st.headline = regs + ([] if rep.returncode == 0 else ["resource check FAILED (stack or spills), see build_resources.log"])
            if rep.returncode != 0:
                return "failed"
        return status

    def s_smoke(self, st: Stage) -> str:
        out = self.work / "smoke.json"
        args = [self.py, "scripts/gpu_smoke.py", str(out)] + (["--device", "cpu"] if self.dry else [])
        status = self.run(st, [args], self.work / "smoke.log")
        if out.exists():
            r = json.loads(out.read_text())
            st.headline = [f"{r['passed']} cases passed, {r['failed']} failed ({r['device']}, size {r['size']})"]
            st.headline += [f"FAILED {c['case']}: {c['detail'][:160]}" for c in r["cases"] if c["outcome"] == "failed"][:8]
            st.headline += [f"{c['case']}: unavailable" for c in r["cases"] if c["outcome"] == "unavailable"]
        return status

    def pytest_stage(self, st: Stage, selector: str, shards: int) -> str:
        base = [self.py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
        target = ["tests/gpu_ready/test_cuda_paths.py"] if self.dry else ["tests"]
        select = ["-m", "gpu", "-k", selector]
        ids = subprocess.run(base + ["--collect-only"] + select + target, cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=self.left(180)).stdout  # fmt: skip
        nodes = [line.strip() for line in ids.splitlines() if "::" in line]
        if not nodes:
            st.detail = "no tests selected"
            return "failed"
        shards = max(1, min(shards, len(nodes)))
        cmds = []
        for i in range(shards):
            part = nodes[i::shards]
            cmds.append(base + [f"--junitxml={self.work / f'{st.name}.{i}.xml'}"] + part)
        status = self.run(st, cmds, self.work / f"{st.name}.log")
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failures = []
        for i in range(shards):
            xml = self.work / f"{st.name}.{i}.xml"
            if not xml.exists():
                continue
            for case in ET.parse(xml).getroot().iter("testcase"):
                kinds = {child.tag for child in case}
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                if "failure" in kinds:
                    counts["failed"] += 1
                    failures.append(name)
                elif "error" in kinds:
                    counts["errors"] += 1
                    failures.append(name)
                elif "skipped" in kinds:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
        ran = sum(counts.values())
        st.detail = f"{len(nodes)} tests in {shards} shard(s)"
        st.headline = [", ".join(f"{v} {k}" for k, v in counts.items()) + (f" ({len(nodes) - ran} not reached)" if ran < len(nodes) else "")]
        st.headline += [f"FAILED {f}" for f in failures[:10]]
        return status

    def bench(self, st: Stage, cmds: list[list[str]], log: str) -> str:
        if self.dry:
            if os.environ.get("GPU_CHECK_DRY_TIMEOUT_STAGE") == st.name:
                cmds = [[self.py, "-c", "import time; print('dry run: sleeping past the timeout'); time.sleep(600)"]]
            else:
                csv_path = self.work / f"{st.name}_dry.csv"
                cmds = [[self.py, "-c", f"open({str(csv_path)!r}, 'w').write('dry,run\\n1,2\\n'); print('dry run stand-in')"]]
        return self.run(st, cmds, self.work / log)

    def s_bench_ops(self, st: Stage) -> str:
        status = self.bench(st, [[self.py, "benchmarks/bench_ops.py", "--device", "cuda", "--quick", "--out", str(self.work / "bench")]],
                            "bench_ops.log")  # fmt: skip
        for path in sorted((self.work / "bench").glob("benchmarks.csv")):
            st.headline += roofline_headline(path)
        return status

    def s_bench_meta(self, st: Stage) -> str:
        cmds = []
        backends = ["cpp", "triton"] if self.ext_ok else ["triton"]
        if not self.ext_ok:
            st.detail = "cpp half skipped: the extension did not build"
        for b in backends:
            cmds.append([self.py, "benchmarks/bench_meta_iteration.py", "--device", "cuda", "--quick", "--nets", "omniglot",
                         "--backend", b, "--modes", "seed,l2l,sequential,batched,graph",
                         "--out", str(self.work / f"meta_iteration_cuda_{b}.csv")])  # fmt: skip
        # One after the other: timing two runs at once on one GPU would measure the contention.
        status = "passed"
        for cmd in cmds:
            s = self.bench(st, [cmd], f"bench_meta_{cmd[cmd.index('--backend') + 1]}.log")
            if s != "passed":
                status = s
            if s == "timed out":
                break
        for path in sorted(self.work.glob("meta_iteration_cuda_*.csv")):
            st.headline += meta_headline(path)
        return status

    # ------------------------------------------------------------ results

    def publish(self) -> None:
        """Rewrite summary.md/summary.json and refresh the archive (atomic renames)."""
        lines = [
            f"# gpu-check {'(dry run) ' if self.dry else ''}{self.started:%Y-%m-%d %H:%M} UTC",
            "",
            *[f"    {line}" for line in self.env_lines],
            "",
            "| stage | status | seconds | expected s | timeout s | Triton compiles | detail |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            lines.append(f"| {s.name} | {s.status} | {s.seconds} | {s.expected_s} | {s.timeout_s} | "
                         f"{'' if s.compiles is None else s.compiles} | {s.detail} |")  # fmt: skip
        lines.append("")
        for s in self.stages:
            if s.headline:
                lines += [f"## {s.name}", "", *[f"- {h}" for h in s.headline], ""]
        total = round(sum(s.seconds for s in self.stages), 1)
        lines.append(f"Total {total} s of stages; every log, junit file, CSV and chart is in gpu_check.tgz.")
        self._write(self.out / "summary.md", "\n".join(lines) + "\n")
        data = {"dry_run": self.dry, "env": self.env_lines, "stages": [s.__dict__ for s in self.stages]}
        self._write(self.out / "summary.json", json.dumps(data, indent=1, default=str))
        self.archive()

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def archive(self) -> None:
        tmp = self.out / "gpu_check.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if not path.is_file() or self.triton_cache in path.parents:
                    continue
                arc = str(path.relative_to(self.work))
                if path.stat().st_size > MAX_LOG_BYTES and path.suffix in (".log", ".txt"):
                    data = path.read_bytes()[-MAX_LOG_BYTES:]
                    info = tarfile.TarInfo(arc)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    tar.add(path, arcname=arc)
            tar.add(self.out / "summary.md", arcname="summary.md")
        tmp.replace(self.out / "gpu_check.tgz")


def _harness_rows(path: Path, benchmark: str) -> list[dict]:
    """Rows of one benchmark from a CSV in the harness schema (benchmarks/harness.py)."""
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("benchmark") == benchmark and r.get("median_s")]


def roofline_headline(path: Path) -> list[str]:
    """Per op and fused backend: bandwidth and fraction of the triad roofline measured in
    the same rounds, at the largest size."""
    rows = [r for r in _harness_rows(path, "ops") if r["provider"] in ("cpp", "triton") and r.get("roofline_fraction")]
    out = []
    for op, provider in sorted({(r["op"], r["provider"]) for r in rows}):
        sub = [r for r in rows if r["op"] == op and r["provider"] == provider]
        top = max(int(float(r["numel"])) for r in sub)
        at_top = [r for r in sub if int(float(r["numel"])) == top]
        gb = statistics.median(float(r["gbps"]) for r in at_top)
        frac = statistics.median(float(r["roofline_fraction"]) for r in at_top)
        out.append(f"{op} {provider}: {gb:.0f} GB/s = {frac:.2f} of the triad roofline at numel {top}")
    return out


def meta_headline(path: Path) -> list[str]:
    """Meta-iterations per second per net and mode, with the ratio to the baseline of the same rounds."""
    out = []
    for r in _harness_rows(path, "meta_iteration"):
        if r.get("metric") != "meta_it_per_s" or not r.get("value"):
            continue
        ratio = f" (x{float(r['ratio_vs_baseline']):.2f} vs {r['baseline_provider']})" if r.get("ratio_vs_baseline") else ""
        out.append(f"{r['case']} {r['provider']}: {float(r['value']):.1f} meta-it/s{ratio}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="make gpu-check: staged GPU validation")
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 540)),
                   help="seconds for all stages together (default 540: under the device tool's 600 s per command)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for logs (default: a temp folder)")
    args = p.parse_args(argv)
    py = os.environ.get("PYTHON") or sys.executable
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_work_{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    check = Check(args.out, work, args.dry_run, args.budget, py)
    cores = os.cpu_count() or 1
    shards = 1 if args.dry_run else max(1, min(6, cores // 2))
    dry_shards = 2
    # Expected seconds on the H200 machine (16 cores, cold Triton cache): see gpu_check.sh's header.
    T = dict(
        env=(5, 60), build=(90, 240), smoke=(45, 75), cpp_tests=(45, 120), triton_tests=(90, 180),
        bench_ops=(35, 90), bench_meta=(45, 120),
    )  # fmt: skip
    if args.dry_run:  # tiny settings: the machinery, not the numbers
        T = {k: (2, 120) for k in T}
        if os.environ.get("GPU_CHECK_DRY_TIMEOUT_STAGE") in T:
            T[os.environ["GPU_CHECK_DRY_TIMEOUT_STAGE"]] = (2, 3)
    check.stage(Stage("env", *T["env"]), check.s_env)
    check.stage(Stage("build", *T["build"]), check.s_build)
    check.stage(Stage("smoke", *T["smoke"]), check.s_smoke)
    check.stage(Stage("cpp_tests", *T["cpp_tests"], needs_ext=True),
                lambda st: check.pytest_stage(st, "not triton", dry_shards if args.dry_run else shards))
    check.stage(Stage("triton_tests", *T["triton_tests"]),
                lambda st: check.pytest_stage(st, "triton", dry_shards if args.dry_run else shards))
    check.stage(Stage("bench_ops", *T["bench_ops"], needs_ext=True), check.s_bench_ops)
    check.stage(Stage("bench_meta", *T["bench_meta"]), check.s_bench_meta)
    bad = [s.name for s in check.stages if s.status in ("failed", "timed out")]
    print(f"gpu_check: {'all stages passed' if not bad else 'problems in ' + ', '.join(bad)}; {args.out}/summary.md")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
