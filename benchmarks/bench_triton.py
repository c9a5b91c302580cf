"""The Triton column of the op benchmark on a GPU: ``bench_ops.py`` restricted to the
backends (triton, cpp, reference), ratios against cpp.

Kept for its command line (scripts/gpu_check.sh calls it); ``bench_ops.py --device
cuda`` measures the same providers (and the PyTorch ones) in one run.  Targets
(issue 4): Triton within 10 % of the extension for P >= 6.4e7, and >= 90 % of the
roofline.

    python benchmarks/bench_triton.py [--sizes 1048576 64000000] [--dtypes float32 bfloat16]

Writes rows of the harness schema into --out (default benchmarks/results/benchmarks.csv;
rows of other runs stay).  Needs a CUDA GPU; without one it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ops  # noqa: E402
import harness as h  # noqa: E402

DEFAULT_SIZES = (1 << 20, 1 << 24, 64_000_000, 256_000_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(bench_ops.DTYPES))
    parser.add_argument("--ops", nargs="+", default=list(bench_ops.OPS), choices=bench_ops.OPS)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per case")
    parser.add_argument("--out", type=Path, default=h.RESULTS / "benchmarks.csv", help="CSV path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 1
    rows = bench_ops.run("cuda", rounds=args.rounds, ops=args.ops, dtypes=args.dtypes, sizes=args.sizes,
                         counts=[1], providers=bench_ops.BACKENDS, baseline="cpp",
                         log=lambda s: print(s, flush=True))  # fmt: skip
    print(f"wrote {h.write_csv(args.out, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
