"""The Triton column of the op benchmark: each flat-buffer op, timed on a GPU.

For every op, dtype and buffer length it times the Triton backend and, beside it, the
reference op (PyTorch's primitives) and the C++/CUDA extension when it is built, with
``triton.testing.do_bench`` (median and 20/80 % quantiles, milliseconds).  Bandwidth
is the bytes the op must move divided by the median time, and is also given as a
fraction of this GPU's device-to-device copy bandwidth (``dst.copy_(src)``, measured
the same way on a buffer of the same byte size).  Targets (issue 4): Triton within
10 % of the extension for P >= 6.4e7, and >= 90 % of the copy bandwidth.

    python benchmarks/bench_triton.py [--sizes 1048576 64000000] [--dtypes float32 bfloat16]

Writes ``benchmarks/results/triton_<gpu>.csv``.  ``bench_rows(...)`` returns the same
rows for another script (benchmarks/bench_ops.py) to merge into its table.  Needs a
CUDA GPU; without one it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
OPS = ("sgd_step_", "adam_step_", "task_end_", "meta_update_", "batched_meta_update_")
DEFAULT_SIZES = (1 << 20, 1 << 24, 64_000_000, 256_000_000)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BATCH_ROWS = 5
FIELDS = (
    "op", "dtype", "numel", "impl", "median_ms", "p20_ms", "p80_ms", "gbps", "copy_gbps", "frac_of_copy",
    "device", "torch", "triton",
)  # fmt: skip


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def bytes_moved(op: str, numel: int, dtype: torch.dtype) -> int:
    """Bytes an ideal kernel reads plus writes for one call (the benchmark's configuration)."""
    e = torch.empty((), dtype=dtype).element_size()
    o = torch.empty((), dtype=_opmath(dtype)).element_size()
    per_element = {
        "sgd_step_": 5 * e,  # read param, grad, momentum buffer; write param, buffer
        "adam_step_": 7 * e,  # read param, grad, exp_avg, exp_avg_sq; write the three states
        "task_end_": 2 * e + 2 * o,  # read param, anchor, acc; write acc, param (anchor is read into param)
        "meta_update_": 2 * e + 2 * o,  # read anchor, acc; write param, acc
        "batched_meta_update_": (2 * BATCH_ROWS + 2) * e,  # read theta and n rows; write theta and n rows
    }[op]
    return per_element * numel


def _call(backend, op: str, numel: int, dtype: torch.dtype) -> Callable[[], None]:
    """A zero-argument call of ``op`` on fresh CUDA buffers (in place, safe to repeat)."""
    dev = "cuda"

    def buf(positive=False, dt=dtype):
        t = torch.randn(numel, device=dev, dtype=torch.float32)
        return (t.abs() if positive else t).to(dt)

    lr = torch.tensor(1e-3, device=dev)
    if op == "sgd_step_":
        p, g, b = buf(), buf(), buf()
        return lambda: backend.sgd_step_(p, g, b, lr, momentum=0.9)
    if op == "adam_step_":
        p, g, m, v = buf(), buf(), buf(), buf(positive=True)
        step = torch.tensor(10.0, device=dev)
        return lambda: backend.adam_step_(p, g, m, v, None, step, lr)
    if op == "task_end_":
        p, anchor, acc = buf(), buf(), torch.zeros(numel, device=dev, dtype=_opmath(dtype))
        return lambda: backend.task_end_(p, anchor, acc)
    if op == "meta_update_":
        p, anchor, acc = buf(), buf(), buf(dt=_opmath(dtype))
        meta_lr, n = torch.tensor(0.5, device=dev), torch.tensor(3.0, device=dev)
        return lambda: backend.meta_update_(p, anchor, acc, meta_lr, n)
    if op == "batched_meta_update_":
        theta = buf()
        tasks = torch.randn(BATCH_ROWS, numel, device=dev).to(dtype)
        meta_lr = torch.tensor(0.5, device=dev)
        return lambda: backend.batched_meta_update_(theta, tasks, meta_lr)
    raise ValueError(op)


def _impls() -> dict[str, object]:
    from reptile_fused.backends import get_backend, unavailable_reason

    impls = {}
    for name in ("triton", "cpp", "reference"):
        reason = unavailable_reason(name, "cuda")
        if reason is None:
            impls[name] = get_backend(name, "cuda")
        else:
            print(f"  {name}: not measured ({reason})", file=sys.stderr)
    return impls


def _timed(fn: Callable[[], None]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timed runs
    torch.cuda.synchronize()
    median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def copy_gbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth: bytes read plus written per second, in GB/s."""
    n = max(nbytes // 2 // 4, 1)  # a copy reads and writes: half the bytes each way
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    median, _, _ = _timed(lambda: dst.copy_(src))
    return 2 * n * 4 / (median * 1e-3) / 1e9


def bench_rows(
    sizes: Iterable[int] = DEFAULT_SIZES,
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16),
    ops: Iterable[str] = OPS,
    impls: dict[str, object] | None = None,
) -> list[dict]:
    """One row per (op, dtype, size, implementation); see FIELDS."""
    import triton

    if not torch.cuda.is_available():
        raise RuntimeError("bench_triton needs a CUDA GPU")
    impls = _impls() if impls is None else impls
    device = torch.cuda.get_device_name()
    rows = []
    copy_cache: dict[int, float] = {}
    for op in ops:
        for dtype in dtypes:
            for numel in sizes:
                nbytes = bytes_moved(op, numel, dtype)
                if nbytes * 1.5 > torch.cuda.mem_get_info()[0]:
                    print(f"  skip {op} {dtype} {numel}: not enough GPU memory", file=sys.stderr)
                    continue
                if nbytes not in copy_cache:
                    copy_cache[nbytes] = copy_gbps(nbytes)
                for name, backend in impls.items():
                    fn = _call(backend, op, numel, dtype)
                    median, p20, p80 = _timed(fn)
                    del fn
                    gbps = nbytes / (median * 1e-3) / 1e9
                    rows.append(
                        dict(
                            op=op, dtype=str(dtype).removeprefix("torch."), numel=numel, impl=name,
                            median_ms=f"{median:.5f}", p20_ms=f"{p20:.5f}", p80_ms=f"{p80:.5f}",
                            gbps=f"{gbps:.1f}", copy_gbps=f"{copy_cache[nbytes]:.1f}",
                            frac_of_copy=f"{gbps / copy_cache[nbytes]:.3f}",
                            device=device, torch=torch.__version__, triton=triton.__version__,
                        )  # fmt: skip
                    )
                    print(
                        f"{op:22s} {rows[-1]['dtype']:9s} {numel:>11d} {name:9s} "
                        f"{median:9.4f} ms  {gbps:8.1f} GB/s  {gbps / copy_cache[nbytes]:6.1%} of copy"
                    )
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/triton_<gpu>.csv)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 1
    rows = bench_rows(args.sizes, [DTYPES[d] for d in args.dtypes], args.ops)
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()
    out = args.out or RESULTS / f"triton_{gpu}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
