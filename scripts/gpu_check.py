"""`make gpu-check`: the GPU validation run, in stages that each stream their results.

    python scripts/gpu_check.py OUT [--dry-run] [--budget SECONDS]

Called by scripts/gpu_check.sh.  One budget (default 360 s, after the machine's start)
covers every stage; PLAN below gives each stage's expected seconds and timeout, and the
timeouts add up to the budget.  A stage's timeout covers everything it runs (test
collection, shards, reports).  Out of time, a stage's processes get SIGINT, then
SIGKILL a few seconds later, and what they wrote stays: pytest outcomes are streamed
one line per test (scripts/gpu_check_outcomes.py) and benchmark rows one line per
measurement (benchmarks/harness.py, BENCH_STREAM_CSV).  After every stage -- passed,
failed, timed out or skipped -- OUT/summary.md and OUT/summary.json are rewritten and
OUT/gpu_check.tgz refreshed with every log, junit file, outcome stream, CSV and chart so
far.  OUT never holds more than those three files: the device tool brings back at most 8.

Stages, headline numbers first: env, build, smoke, bench_ops, bench_meta, cpp_tests,
triton_tests, bench_eval.  A failed build skips only what needs the extension (the op
benchmark, the cpp half of the meta-iteration benchmark, the cpp tests); the Triton
stages still run.  GPU tests are selected by the ``gpu`` marker (``-m gpu``), split into
cpp and Triton by ``-k triton``, so they are found wherever they live under tests/.
Every skip is counted with its reason in the summary, modules skipped at collection too.

Triton compile work is bounded: the benchmarks autotune over two configurations
(REPTILE_FUSED_TRITON_TUNE=quick), the test stages over none (``single``: one
configuration, so Triton never benchmarks there); one cold TRITON_CACHE_DIR serves the
whole run, and each stage's new compiles (cubins added to it) are in the summary.

``--dry-run`` runs the same machinery on a machine without a GPU, as `make test` does
(tests/gpu_ready/test_gpu_check.py): no build, the pytest stages on one small file (the
GPU tests skip), the smoke stage on CPU at tiny sizes, the benchmark stages replaced by
stand-ins of a few seconds, each stage under a placeholder timeout; summary.json still
reports the GPU plan (``budget_s`` and PLAN's ``timeout_s``/``expected_s``).
GPU_CHECK_DRY_TIMEOUT_STAGE=<stage> makes that stage time out and
GPU_CHECK_DRY_BUILD_FAILS=1 simulates a failed build, so the test exercises the timeout
and skip paths too.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LOG_BYTES = 4 << 20  # each log is cut to its last 4 MiB in the archive


# The plan on the H200 machine (16 cores, cold Triton cache), in the order the stages run:
# (expected seconds, timeout seconds).  Headline numbers first, then the GPU tests.  The
# timeouts add up to the default budget, and each timeout covers everything its stage
# runs: test collection, the pytest shards, the build's resource report, the SIGINT grace.
# Expected seconds from the H200 runs of 2026-12-04 (benchmarks/results/gpu_h200/): the
# build uses GPU_CHECK_PREBUILT (an in-place build fails on that image's GCC 13), each test
# stage runs one shard per core; the third run's bench_meta needed more than 40 s, the fourth
# run's cpp tests more than 80 s (1461 tests); in the fifth (a cold machine) importing
# torch alone took more than 8 s.
PLAN = {
    "env": (7, 25),
    "build": (10, 20),
    "smoke": (19, 25),
    "bench_ops": (22, 30),
    "bench_meta": (38, 50),
    "cpp_tests": (76, 95),
    "triton_tests": (72, 90),
    "bench_eval": (20, 25),
}
DEFAULT_BUDGET = 360  # seconds after the machine's start-up: 10 minutes a command, 15 in all
GRACE_S = 5  # a stage out of time gets SIGINT this long before SIGKILL: pytest writes its junit


def _wait_all(procs: list[subprocess.Popen], until: float | None) -> bool:
    """Wait for every process until the monotonic time ``until`` (None: for ever);
    whether all of them ended."""
    for p in procs:
        try:
            p.wait(timeout=None if until is None else max(0.05, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return True


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


@dataclass
class Stage:
    name: str
    expected_s: int
    timeout_s: int
    needs_ext: bool = False
    run_timeout_s: float | None = None  # what this run enforces (the dry run's placeholders); else timeout_s
    status: str = "pending"  # passed / failed / timed out / skipped
    seconds: float = 0.0
    detail: str = ""
    compiles: int | None = None
    headline: list[str] = field(default_factory=list)


class Check:
    def __init__(self, out: Path, work: Path, dry: bool, budget: float, py: str, plan_budget: float | None = None):
        self.out, self.work, self.dry, self.py = out, work, dry, py
        self.deadline = time.monotonic() + budget
        self.stage_end = self.deadline
        self.budget_s = plan_budget if plan_budget is not None else budget
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
        # The GPU test stages never autotune: one configuration, so Triton never benchmarks
        # there (it would, per key, even with one configuration left after pruning).
        self.test_env = dict(self.env, REPTILE_FUSED_TRITON_TUNE="single")
        self.test_env["PYTHONPATH"] = f"{ROOT / 'scripts'}{os.pathsep}{self.env['PYTHONPATH']}"

    # ------------------------------------------------------------ running

    def left(self) -> float:
        """Seconds a helper command may take: never past the stage's end (its timeout, cut
        to the budget)."""
        return max(1.0, self.stage_end - time.monotonic())

    def cubins(self) -> int:
        return sum(1 for _ in self.triton_cache.rglob("*.cubin")) if self.triton_cache.exists() else 0

    def run(self, stage: Stage, cmds: list[list[str]], log: Path, env=None) -> str:
        """Run ``cmds`` concurrently (each in its own process group) until the stage's end;
        returns passed / failed / timed out.  Out of time, they get SIGINT first (pytest
        then still writes its junit and the outcome stream is already on disk), and
        SIGKILL ``GRACE_S`` seconds later."""
        end = self.stage_end
        if end - time.monotonic() <= 1:
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
        grace = min(GRACE_S, max(0.5, (end - time.monotonic()) / 4))
        timed_out = not _wait_all(procs, end - grace)
        if timed_out:
            _signal_all(procs, signal.SIGINT)
            if not _wait_all(procs, end):
                _signal_all(procs, signal.SIGKILL)
                _wait_all(procs, None)
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
            limit = stage.run_timeout_s if stage.run_timeout_s is not None else stage.timeout_s
            self.stage_end = min(start + limit, self.deadline)
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
        if os.environ.get("GPU_CHECK_PREBUILT") == "1":
            found = self._prebuilt()
            if found:
                st.detail = f"prebuilt library used: {found}"
                return self._resource_report(st)
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
        return self._resource_report(st) if self.ext_ok else status

    def _prebuilt(self) -> str | None:
        """GPU_CHECK_PREBUILT=1: a library already in the tree (built elsewhere, e.g. by
        `make test-compat` against this machine's torch) is used when it was built for
        this torch with CUDA kernels for this GPU; what it was built against, or None."""
        code = ("import torch, reptile_fused._C, reptile_fused._build_info as b\n"
                "cap = '%d.%d' % torch.cuda.get_device_capability()\n"
                "ok = b.TORCH_VERSION == torch.__version__ and b.WITH_CUDA and cap in b.CUDA_ARCH_LIST.replace(' ', ';').split(';')\n"
                "print(f'torch {b.TORCH_VERSION}, arch {b.CUDA_ARCH_LIST}' if ok else '')\n")  # fmt: skip
        probe = subprocess.run([self.py, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True,
                               timeout=self.left())  # fmt: skip
        (self.work / "build.log").write_text(f"# prebuilt probe\n{probe.stdout}{probe.stderr}")
        return probe.stdout.strip() or None

    def _resource_report(self, st: Stage) -> str:
        """The cubins' registers, stack and spills (tests/gpu_ready/test_cuda_build.py)."""
        rep = subprocess.run([self.py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                              "tests/gpu_ready/test_cuda_build.py"], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=self.left())  # fmt: skip
        (self.work / "build_resources.log").write_text(rep.stdout + rep.stderr)
        regs = re.findall(r"sm_\d+\w*: \d+ kernels, registers \S+", rep.stdout)
        st.headline = regs + ([] if rep.returncode == 0 else ["resource check FAILED (stack or spills), see build_resources.log"])
        return "passed" if rep.returncode == 0 else "failed"

    def s_smoke(self, st: Stage) -> str:
        out = self.work / "smoke.json"
        args = [self.py, "scripts/gpu_smoke.py", str(out)] + (["--device", "cpu"] if self.dry else [])
        status = self.run(st, [args], self.work / "smoke.log", env=self.test_env)  # a check: no tuning
        if out.exists():
            r = json.loads(out.read_text())
            st.headline = [f"{r['passed']} cases passed, {r['failed']} failed ({r['device']}, size {r['size']})"]
            st.headline += [f"FAILED {c['case']}: {c['detail'][:160]}" for c in r["cases"] if c["outcome"] == "failed"][:8]
            st.headline += [f"{c['case']}: unavailable" for c in r["cases"] if c["outcome"] == "unavailable"]
        return status

    def pytest_stage(self, st: Stage, selector: str, shards: int) -> str:
        """The GPU tests ``-k selector`` in shards, with every outcome streamed to
        ``<stage>.outcomes.jsonl`` as it happens (scripts/gpu_check_outcomes.py)."""
        base = [self.py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "gpu_check_outcomes"]
        target = ["tests/gpu_ready/test_cuda_paths.py"] if self.dry else ["tests"]
        select = ["-m", "gpu", "-k", selector]
        outcomes = self.work / f"{st.name}.outcomes.jsonl"
        env = dict(self.test_env, GPU_CHECK_OUTCOMES=str(outcomes))
        ids = subprocess.run(base + ["--collect-only"] + select + target, cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=self.left()).stdout  # fmt: skip
        nodes = [line.strip() for line in ids.splitlines() if "::" in line]
        if not nodes:
            st.detail = "no tests selected"
            st.headline = outcome_headline(outcomes, 0)
            return "failed"
        shards = max(1, min(shards, len(nodes)))
        cmds = []
        for i in range(shards):
            part = nodes[i::shards]
            cmds.append(base + [f"--junitxml={self.work / f'{st.name}.{i}.xml'}"] + part)
        status = self.run(st, cmds, self.work / f"{st.name}.log", env=env)
        st.detail = f"{len(nodes)} tests in {shards} shard(s)"
        st.headline = outcome_headline(outcomes, len(nodes))
        return status

    def bench(self, st: Stage, cmds: list[list[str]], log: str) -> str:
        """Run benchmark commands one after the other (timing two at once on one GPU would
        measure the contention) until the first that does not pass.  Every row is also
        appended to ``<stage>.stream.csv`` the moment it is measured."""
        if self.dry:
            if os.environ.get("GPU_CHECK_DRY_TIMEOUT_STAGE") == st.name:
                cmds = [[self.py, "-c", "import time; print('dry run: sleeping past the timeout'); time.sleep(600)"]]
            else:
                csv_path = self.work / f"{st.name}_dry.csv"
                cmds = [[self.py, "-c", f"open({str(csv_path)!r}, 'w').write('dry,run\\n1,2\\n'); print('dry run stand-in')"]]
        env = dict(self.env, BENCH_STREAM_CSV=str(self.work / f"{st.name}.stream.csv"))
        status = "passed"
        for i, cmd in enumerate(cmds):
            status = self.run(st, [cmd], self.work / (log if len(cmds) == 1 else log.replace(".log", f"_{i}.log")), env=env)
            if status != "passed":
                break
        return status

    def results(self, st: Stage, final: list[Path]) -> list[Path]:
        """The CSVs a benchmark stage wrote; the stream of rows if it did not get that far."""
        done = [p for p in final if p.exists()]
        stream = self.work / f"{st.name}.stream.csv"
        return done or ([stream] if stream.exists() else [])

    def s_bench_ops(self, st: Stage) -> str:
        out = self.work / "bench"
        status = self.bench(st, [[self.py, "benchmarks/bench_ops.py", "--device", "cuda", "--quick", "--out", str(out)]],
                            "bench_ops.log")  # fmt: skip
        for path in self.results(st, [out / "benchmarks.csv"]):
            st.headline += roofline_headline(path)
        return status

    def s_bench_meta(self, st: Stage) -> str:
        """cpp, then Triton, under the stage's one timeout; peak memory is not measured
        here (it would take one fresh process per mode)."""
        backends = ["cpp", "triton"] if self.ext_ok else ["triton"]
        if not self.ext_ok:
            st.detail = "cpp half skipped: the extension did not build"
        cmds = [[self.py, "benchmarks/bench_meta_iteration.py", "--device", "cuda", "--quick", "--no-memory",
                 "--nets", "omniglot", "--backend", b, "--modes", "seed,l2l,sequential,batched,graph",
                 "--out", str(self.work / f"meta_iteration_cuda_{b}.csv")] for b in backends]  # fmt: skip
        status = self.bench(st, cmds, "bench_meta.log")
        for path in self.results(st, [self.work / f"meta_iteration_cuda_{b}.csv" for b in backends]):
            st.headline += meta_headline(path)
        return status

    def s_bench_eval(self, st: Stage) -> str:
        """Evaluation throughput: sequential, batched and batched as a CUDA graph."""
        out = self.work / "eval"
        status = self.bench(st, [[self.py, "benchmarks/bench_eval.py", "--device", "cuda", "--cases", "omniglot",
                                  "--batch-tasks", "8", "--tasks", "8", "--rounds", "2", "--cuda-graph",
                                  "--out", str(out)]], "bench_eval.log")  # fmt: skip
        for path in self.results(st, [out / "benchmarks.csv"]):
            st.headline += eval_headline(path)
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
        lines.append(f"Total {total} s of stages (budget {self.budget_s:g} s); every log, junit file, outcome "
                     "stream, CSV and chart is in gpu_check.tgz.")  # fmt: skip
        self._write(self.out / "summary.md", "\n".join(lines) + "\n")
        data = {
            "dry_run": self.dry,
            "env": self.env_lines,
            "budget_s": self.budget_s,
            "plan": [{"name": n, "expected_s": e, "timeout_s": t} for n, (e, t) in PLAN.items()],
            "stages": [s.__dict__ for s in self.stages],
        }
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


def read_outcomes(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by SIGKILL
            pass
    return out


def outcome_headline(path: Path, selected: int) -> list[str]:
    """Counts per outcome, what was not reached, every skip reason with its count (nothing
    skipped silently: modules skipped at collection too), and the first failures."""
    records = read_outcomes(path)
    tests = [r for r in records if not r["outcome"].startswith("collect")]
    counts = {k: sum(r["outcome"] == k for r in tests) for k in ("passed", "failed", "error", "skipped")}
    ran = sum(counts.values())
    lines = [", ".join(f"{v} {k}" for k, v in counts.items()) + (f" ({selected - ran} not reached)" if ran < selected else "")]
    reasons: dict[str, int] = {}
    for r in tests:
        if r["outcome"] == "skipped":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    lines += [f"{n} skipped: {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    lines += [f"module {r['outcome'].removeprefix('collect ')} at collection: {r['test']}: {r['reason']}"
              for r in records if r["outcome"].startswith("collect")]  # fmt: skip
    lines += [f"FAILED {r['test']}: {r['reason']}" for r in tests if r["outcome"] in ("failed", "error")][:10]
    return lines


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


def rate_headline(path: Path, benchmark: str, metric: str, unit: str) -> list[str]:
    """One line per case and mode of ``benchmark``: its ``metric`` in ``unit``, with the
    ratio to the baseline measured in the same rounds where the row has one."""
    out = []
    for r in _harness_rows(path, benchmark):
        if r.get("metric") != metric or not r.get("value"):
            continue
        ratio = f" (x{float(r['ratio_vs_baseline']):.2f} vs {r['baseline_provider']})" if r.get("ratio_vs_baseline") else ""
        out.append(f"{r['case']} {r['provider']}: {float(r['value']):.1f} {unit}{ratio}")
    return out


def meta_headline(path: Path) -> list[str]:
    """Meta-iterations per second per net and mode, against the seed loop."""
    return rate_headline(path, "meta_iteration", "meta_it_per_s", "meta-it/s")


def eval_headline(path: Path) -> list[str]:
    """Evaluation tasks per second per mode, against sequential evaluation."""
    return rate_headline(path, "eval", "tasks_per_s", "tasks/s")


def test_shards(cores: int) -> int:
    """pytest processes of a GPU test stage: one per core (each compiles its Triton
    kernels and drives its small test launches from one core), at most 16."""
    return max(1, min(16, cores))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="make gpu-check: staged GPU validation")
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", DEFAULT_BUDGET)),
                   help=f"seconds for all stages together (default {DEFAULT_BUDGET}; the stage timeouts add up to it)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for logs (default: a temp folder)")
    args = p.parse_args(argv)
    py = os.environ.get("PYTHON") or sys.executable
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_work_{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # The dry run exercises the machinery with placeholder timeouts of its own, and
    # reports the GPU plan (PLAN, the budget) as the plan.
    dry_timeout = {k: 120.0 for k in PLAN}
    if args.dry_run and os.environ.get("GPU_CHECK_DRY_TIMEOUT_STAGE") in PLAN:
        dry_timeout[os.environ["GPU_CHECK_DRY_TIMEOUT_STAGE"]] = 3.0
    run_budget = sum(dry_timeout.values()) if args.dry_run else args.budget
    check = Check(args.out, work, args.dry_run, run_budget, py, plan_budget=args.budget)
    shards = 2 if args.dry_run else test_shards(os.cpu_count() or 1)

    def stage(name, body, needs_ext=False):
        expected, timeout = PLAN[name]
        check.stage(Stage(name, expected, timeout, needs_ext, dry_timeout[name] if args.dry_run else None), body)

    stage("env", check.s_env)
    stage("build", check.s_build)
    stage("smoke", check.s_smoke)
    stage("bench_ops", check.s_bench_ops, needs_ext=True)
    stage("bench_meta", check.s_bench_meta)
    stage("cpp_tests", lambda st: check.pytest_stage(st, "not triton", shards), needs_ext=True)
    stage("triton_tests", lambda st: check.pytest_stage(st, "triton", shards))
    stage("bench_eval", check.s_bench_eval)
    bad = [s.name for s in check.stages if s.status in ("failed", "timed out")]
    print(f"gpu_check: {'all stages passed' if not bad else 'problems in ' + ', '.join(bad)}; {args.out}/summary.md")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
