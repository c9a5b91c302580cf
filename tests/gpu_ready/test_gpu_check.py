"""`make gpu-check`'s stage machinery, run without a GPU (issue 13, section 1).

``scripts/gpu_check.sh --dry-run`` runs the same stages as on a GPU machine: here with a
simulated failed build (the stages needing the extension must skip, the Triton ones
must still run) and a benchmark stage that times out on purpose, and the result
layout the device tool can bring back (at most 8 files, 16 MiB each, no folders) is
checked.  About 30 s here (smoke on the CPU, one sharded pytest stage).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_BUILD_FAILS="1", GPU_CHECK_DRY_TIMEOUT_STAGE="bench_meta")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc, out


def test_stages_report_pass_fail_skip_and_timeout(dry_run):
    proc, out = dry_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the failed build and the timeout
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    # Headline numbers first, then the GPU tests.
    assert list(stages) == ["env", "build", "smoke", "bench_ops", "bench_meta", "cpp_tests", "triton_tests",
                            "bench_eval"]  # fmt: skip
    status = {name: s["status"] for name, s in stages.items()}
    assert status == {
        "env": "passed",
        "build": "failed",
        "smoke": "passed",  # the Triton half runs; the cpp half is reported unavailable
        "bench_ops": "skipped",  # needs the extension
        "bench_meta": "timed out",
        "cpp_tests": "skipped",  # needs the extension
        "triton_tests": "passed",  # does not
        "bench_eval": "passed",
    }, status
    assert stages["bench_meta"]["seconds"] < 30, "the timeout must stop the stage"
    assert any("skipped" in h for h in stages["triton_tests"]["headline"]), stages["triton_tests"]
    summary = (out / "summary.md").read_text()
    for name in status:
        assert f"| {name} | {status[name]} |" in summary


def test_results_fit_what_the_device_tool_brings_back(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.tgz", "summary.json", "summary.md"], files
    assert all((out / f).stat().st_size < 16 << 20 for f in files)
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = tar.getnames()
    for expected in ("env.txt", "build.log", "smoke.json", "smoke.log", "triton_tests.0.xml", "triton_tests.1.xml",
                     "triton_tests.outcomes.jsonl", "bench_meta.log", "bench_eval.log", "summary.md"):  # fmt: skip
        assert expected in names, names
    assert not any("cpp_tests" in n or "bench_meta_cpp" in n for n in names), "stages needing the extension ran"
    assert all("/" not in n for n in names), "the archive is flat"


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", gc)  # dataclasses look the module up while it loads
    spec.loader.exec_module(gc)
    return gc


def test_the_dry_run_writes_the_gpu_plan_and_it_fits(dry_run):
    """summary.json holds the plan the GPU run uses (not the dry run's placeholders): one
    budget under 6 minutes, every stage's timeout inside it."""
    _, out = dry_run
    data = json.loads((out / "summary.json").read_text())
    gc = _gpu_check_module()
    plan = {s["name"]: (s["expected_s"], s["timeout_s"]) for s in data["plan"]}
    assert plan == gc.PLAN
    assert data["budget_s"] == gc.DEFAULT_BUDGET
    assert sum(t for _, t in plan.values()) <= data["budget_s"] <= 360
    assert all(e <= t for e, t in plan.values())
    for stage in data["stages"]:
        assert (stage["expected_s"], stage["timeout_s"]) == plan[stage["name"]]


def test_the_dry_run_counts_every_skip_with_its_reason(dry_run):
    _, out = dry_run
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    headline = stages["triton_tests"]["headline"]
    assert any(h.endswith("skipped: needs a CUDA device") for h in headline), headline


def test_a_stage_out_of_time_is_interrupted_before_it_is_killed(tmp_path):
    """SIGINT first: a process that handles it (pytest writing its junit) still writes."""
    gc = _gpu_check_module()
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "out").mkdir()
    check = gc.Check(tmp_path / "out", work, dry=True, budget=60, py=sys.executable)
    marker = tmp_path / "interrupted"
    code = ("import signal, sys, time\n"
            f"signal.signal(signal.SIGINT, lambda *a: (open({str(marker)!r}, 'w').write('bye'), sys.exit(3)))\n"
            "time.sleep(60)\n")  # fmt: skip
    stage = gc.Stage("sleepy", 1, 60, run_timeout_s=7)
    check.stage(stage, lambda st: check.run(st, [[sys.executable, "-c", code]], work / "sleepy.log"))
    assert stage.status == "timed out" and stage.seconds < 15
    assert marker.read_text() == "bye"


def test_outcome_headline_counts_streamed_outcomes(tmp_path):
    gc = _gpu_check_module()
    path = tmp_path / "o.jsonl"
    path.write_text("\n".join([
        json.dumps({"test": "a::x", "outcome": "passed", "reason": ""}),
        json.dumps({"test": "a::y", "outcome": "skipped", "reason": "needs a second GPU"}),
        json.dumps({"test": "a::z", "outcome": "failed", "reason": "AssertionError: off"}),
        json.dumps({"test": "tests/b.py", "outcome": "collect skipped", "reason": "could not import 'expecttest'"}),
        '{"test": "cut short by SIGKILL',
    ]))  # fmt: skip
    lines = gc.outcome_headline(path, 5)
    assert lines[0] == "1 passed, 1 failed, 0 error, 1 skipped (2 not reached)"
    assert "1 skipped: needs a second GPU" in lines
    assert "module skipped at collection: tests/b.py: could not import 'expecttest'" in lines
    assert "FAILED a::z: AssertionError: off" in lines


def test_summary_is_published_after_every_stage(tmp_path):
    gc = _gpu_check_module()
    work = tmp_path / "work"
    work.mkdir()
    check = gc.Check(tmp_path / "out", work, dry=True, budget=60, py=sys.executable)
    (tmp_path / "out").mkdir()
    (work / "first.log").write_text("first stage\n")
    check.stage(gc.Stage("first", 1, 10), lambda st: "passed")
    assert "| first | passed |" in (tmp_path / "out" / "summary.md").read_text()
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        assert "first.log" in tar.getnames()

    def broken(st):
        raise RuntimeError("stage crashed")

    check.stage(gc.Stage("second", 1, 10), broken)  # a crashing stage loses nothing before it
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| first | passed |" in summary and "| second | failed |" in summary and "stage crashed" in summary


def test_make_gpu_check_builds_for_the_detected_gpu():
    """The Makefile exports TORCH_CUDA_ARCH_LIST=9.0 and MAX_JOBS=2 to its other targets;
    gpu-check must not pass them on, so the script detects the GPU and uses every core."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "-u TORCH_CUDA_ARCH_LIST" in dry.stdout and "-u MAX_JOBS" in dry.stdout, dry.stdout
    chosen = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x", "TORCH_CUDA_ARCH_LIST=8.0"], cwd=ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert "TORCH_CUDA_ARCH_LIST='8.0'" in chosen.stdout, chosen.stdout
