"""Count the Triton compiles `make gpu-check`'s Triton test stage needs (issue 20).

    python scripts/count_triton_compiles.py [--out benchmarks/results/triton_compiles.json]

Runs the CPU mirror of that stage's op tests (tests/ops, the ``cpu-triton`` cases: the
same test functions as the stage's ``cuda-triton`` ones) under the interpreter, with the
launch recorder of tests/triton_launch_log.py and the stage's tuning
(REPTILE_FUSED_TRITON_TUNE=single), and writes the number of distinct compile keys,
autotune keys and launches, with a fingerprint of the files that decide them.
tests/gpu_ready/test_triton_compile_budget.py checks the count against the stage's
time, and that the fingerprint still matches (rerun this script when it does not:
about 2-3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "triton_compiles.json"
SELECTION = ["-m", "not gpu", "-k", "cpu-triton", "tests/ops"]


def fingerprinted_files() -> list[Path]:
    """What decides the launches: the kernels and launchers, the op table, the op tests."""
    return sorted([ROOT / "reptile_fused/backends/triton/kernels.py", ROOT / "reptile_fused/backends/op_table.py",
                   *(ROOT / "tests/ops").glob("*.py")])  # fmt: skip


def fingerprint() -> str:
    h = hashlib.sha256()
    for path in fingerprinted_files():
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "launches.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
                   REPTILE_FUSED_TRITON_TUNE="single", REPTILE_FUSED_TRITON_LAUNCH_LOG=str(log), TRITON_INTERPRET="1")
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
                               "-p", "triton_launch_log", *SELECTION], cwd=ROOT, env=env)  # fmt: skip
        if proc.returncode != 0:
            print("count_triton_compiles: the mirror's tests failed; no count written", file=sys.stderr)
            return 1
        data = json.loads(log.read_text())
    result = {
        "selection": " ".join(SELECTION),
        "compiles": data["compiles"],
        "autotune_keys": data["autotune_keys"],
        "launches": data["launches"],
        "tune_space": data["tune_space"],
        "fingerprint": fingerprint(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
