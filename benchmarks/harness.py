"""The one benchmark harness: timer, STREAM-style roofline, byte counts, row schema, CSV.

Every script in ``benchmarks/`` times with :class:`Timer`, writes rows of exactly
:data:`SCHEMA` with :func:`write_csv`, and draws with ``benchmarks/plot.py``;
``benchmarks/report.py`` renders the README tables from the CSV.

Timing.  Every variant (provider) of a case runs once per round; the rounds interleave
the variants, rotating their order each round, so background load on a shared machine
hits them alike.  A sample is the per-call time of a batch of calls lasting about
``min_batch_s``; the row reports the median and the 20 % / 80 % quantiles over the
rounds.  Ratios compare medians from the same rounds.

Roofline.  :func:`stream_variants` adds STREAM kernels to a case's rounds, on
preallocated buffers whose footprint matches the op's (so both sit in the same level
of the memory hierarchy): *triad* ``a = b + s*c`` (``torch.add(b, c, alpha=s, out=a)``,
3 words per element), *copy* (``a.copy_(b)``, 2 words) and, for reference, an in-place
*axpy* (``a += s*b``, 3 words).  The roofline is the triad's bandwidth: ``copy_`` runs
well below it on some machines (6.1 against 12.1 GB/s at one thread on the VM of
issue 7), which made ops look faster than memory.  Each op's bytes are the bytes it
must read plus write (:func:`bytes_moved`), and
``roofline_fraction = (bytes / median_s) / triad GB/s``.

Reading the fraction on a CPU: STREAM counts 3 words for the triad, but a cached CPU
also reads each line of ``a`` before writing it (write-allocate), 4 words in all; the
in-place ops (and the axpy) write only lines they have just read.  And one core's
bandwidth is bounded by the cache misses it keeps in flight, which grows with the
number of streams: an op reading 6 arrays can beat a 3-array triad.  Fractions above
100 % at one thread mean exactly that, not a faster-than-memory kernel.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# One row per measurement.  Blank where a column does not apply.
SCHEMA = (
    "benchmark",  # ops | meta_iteration | distributed | roofline
    "op",  # what was timed: sgd_step_, batched_meta_update_, meta_iteration, meta_step, stream-triad, ...
    "case",  # the configuration, as text (n=5 write_back, momentum=0.9, omniglot n=5 k=5 B=10, ...)
    "provider",  # reference | cpp | triton | torch-fused | torch-foreach | torch-forloop | torch | seed loop | ...
    "device",  # cpu | cuda
    "dtype",  # parameter dtype (float32, bfloat16, ...)
    "numel",  # elements per flat buffer (P)
    "tensors",  # parameter tensors the flat buffer is split into (per-tensor providers loop over them)
    "threads",  # torch intra-op threads
    "rounds",  # timed rounds (samples) behind the median
    "median_s", "p20_s", "p80_s",  # seconds per call over the rounds
    "bytes",  # bytes one call must read plus write (bytes_moved); blank if not bandwidth-bound
    "gbps",  # bytes / median_s / 1e9
    "roofline_gbps",  # STREAM triad bandwidth measured in the same rounds, same footprint
    "roofline_fraction",  # gbps / roofline_gbps
    "baseline_provider",  # the provider the ratio compares against, same case, same rounds
    "ratio_vs_baseline",  # baseline median_s / this median_s (> 1: faster than the baseline)
    "metric", "value",  # one derived or extra measure (meta_it_per_s, all_reduce_share, kernel launches)
    "peak_mib",  # peak memory above model and data (meta_iteration)
    "max_abs_diff_vs_baseline",  # largest |θ - θ_baseline| after one step from the same θ
    "max_abs_diff_vs_float64",  # the same against the baseline run in float64
    "machine",  # machine_description()
    "torch",
    "date",
    "note",  # "not measured: <why>", or anything a reader must know
)  # fmt: skip

NOT_MEASURED = "not measured"


# --------------------------------------------------------------------- timing


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def quantile(xs: Iterable[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``xs``."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_s": median(samples), "p20_s": quantile(samples, 0.2), "p80_s": quantile(samples, 0.8),
            "rounds": len(samples)}  # fmt: skip


class Timer:
    """Interleaved rounds: see the module docstring.

    ``sync`` runs before and after each timed batch (``torch.cuda.synchronize`` on CUDA,
    a barrier across processes for a distributed benchmark)."""

    def __init__(self, device: str = "cpu", rounds: int = 9, min_batch_s: float = 0.02,
                 sync: Callable[[], None] | None = None, max_calls: int = 1000):  # fmt: skip
        self.device = str(device)
        self.rounds = rounds
        self.min_batch_s = min_batch_s
        self.max_calls = max_calls
        if sync is None and self.device.startswith("cuda"):
            sync = torch.cuda.synchronize
        self.sync = sync or (lambda: None)

    def batch(self, fn: Callable[[], object], calls: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls

    def calls_for(self, fn: Callable[[], object]) -> int:
        """Calls per batch so a batch lasts about min_batch_s (after a warm-up call)."""
        fn()
        one = self.batch(fn, 1)
        return max(1, min(self.max_calls, int(self.min_batch_s / max(one, 1e-7))))

    def samples(self, variants: Mapping[str, Callable[[], object]], calls: int | None = None,
                warmup: int = 0) -> dict[str, list[float]]:  # fmt: skip
        """Per-call seconds of each variant, one sample per round.  ``calls`` fixes the
        calls per batch (else sized by ``calls_for``, which also warms up); ``warmup``
        runs each variant that many extra times first."""
        names = list(variants)
        for name in names:
            for _ in range(warmup):
                variants[name]()
        per_batch = {name: calls or self.calls_for(variants[name]) for name in names}
        out: dict[str, list[float]] = {name: [] for name in names}
        for r in range(self.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                out[name].append(self.batch(variants[name], per_batch[name]))
        return out


# --------------------------------------------------------------------- roofline

TRIAD, COPY, AXPY = "stream-triad", "stream-copy", "stream-axpy-inplace"


def stream_variants(footprint_bytes: int, device: str, dtype: torch.dtype = torch.float32):
    """STREAM kernels on preallocated buffers of ``footprint_bytes`` in all.  Returns
    ``(variants, bytes_per_call)``, bytes counted as STREAM counts them (each array
    once per element):

    triad  ``a = b + s*c`` into a preallocated ``a``   3 words  (the roofline)
    copy   ``a.copy_(b)``                               2 words
    axpy   ``a += s*b`` in place                        3 words  (no write-allocate
           read of its output, like the in-place ops; for reference)"""
    e = torch.empty((), dtype=dtype).element_size()
    n3 = max(footprint_bytes // (3 * e), 1)
    n2 = max(footprint_bytes // (2 * e), 1)
    a, b, c = (torch.rand(n3, device=device, dtype=dtype) for _ in range(3))
    src, dst = torch.rand(n2, device=device, dtype=dtype), torch.empty(n2, device=device, dtype=dtype)
    x = torch.rand(n2, device=device, dtype=dtype)
    variants = {
        TRIAD: lambda: torch.add(b, c, alpha=3.0, out=a),
        COPY: lambda: dst.copy_(src),
        AXPY: lambda: x.add_(src, alpha=1e-3),
    }
    return variants, {TRIAD: 3 * e * n3, COPY: 2 * e * n2, AXPY: 3 * e * n2}


def timed_with_roofline(timer: Timer, variants: Mapping[str, Callable[[], object]], footprint_bytes: int,
                        device: str) -> tuple[dict[str, dict], dict[str, float]]:  # fmt: skip
    """Time ``variants`` and the STREAM kernels in the same rounds.  Returns the
    summaries of the variants and the GB/s of each STREAM kernel."""
    stream, stream_bytes = stream_variants(footprint_bytes, device)
    raw = timer.samples({**variants, **stream})
    stats = {name: summary(s) for name, s in raw.items()}
    bw = {name: stream_bytes[name] / stats.pop(name)["median_s"] / 1e9 for name in stream}
    return stats, bw


# --------------------------------------------------------------------- bytes


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The accumulator / maths dtype of a parameter dtype: float32 for 16-bit ones."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sizes(dtype: torch.dtype) -> tuple[int, int]:
    """(storage, opmath) element sizes: 16-bit params keep float32 accumulators/maths."""
    e = torch.empty((), dtype=dtype).element_size()
    return e, max(e, 4)


def bytes_moved(op: str, numel: int, dtype: torch.dtype = torch.float32, *, momentum: bool = True,
                amsgrad: bool = False, n: int = 5, write_back: bool = True, update: bool = False) -> int:  # fmt: skip
    """Bytes one call must read plus write (an ideal kernel: each word once).

    sgd_step_            read param, grad (+ buf); write param (+ buf)            5e (3e without momentum)
    adam_step_           read param, grad, m, v (+ vmax); write param, m, v (+ vmax)   7e (9e with amsgrad)
    task_end_            read param, anchor, acc; write acc, param                3e + 2o
    meta_update_         read anchor, acc; write param, acc (zeroed)              2e + 2o
    batched_meta_update_ read theta and n rows; write theta (+ n rows on write-back)  (n+2)e, (2n+2)e

    e: the parameter dtype's size, o: the accumulator's (float32 for 16-bit params).
    ``update`` (first-order MAML): the steps also write their update (+o); task_end_
    reads the update instead of the parameter (2e + 3o).
    """
    e, o = _sizes(dtype)
    u = o if update else 0
    per = {
        "sgd_step_": (5 if momentum else 3) * e + u,
        "adam_step_": (9 if amsgrad else 7) * e + u,
        "task_end_": 2 * e + 3 * o if update else 3 * e + 2 * o,
        "meta_update_": 2 * e + 2 * o,
        "batched_meta_update_": ((2 * n + 2) if write_back else (n + 2)) * e,
    }[op]
    return per * numel


def footprint_bytes(op: str, numel: int, dtype: torch.dtype = torch.float32, *, momentum: bool = True,
                    amsgrad: bool = False, n: int = 5, update: bool = False) -> int:  # fmt: skip
    """Distinct bytes one call touches (sizes the roofline's buffers)."""
    e, o = _sizes(dtype)
    u = o if update else 0
    per = {
        "sgd_step_": (3 if momentum else 2) * e + u,
        "adam_step_": (5 if amsgrad else 4) * e + u,
        "task_end_": 2 * e + o + u,
        "meta_update_": 2 * e + o,
        "batched_meta_update_": (n + 1) * e,
    }[op]
    return per * numel


# --------------------------------------------------------------------- rows


@functools.cache
def machine_description(device: str = "cpu") -> str:
    """The machine in words, e.g. ``Intel(R) Xeon(R) Processor, 2 cores, L3 105 MiB``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name()} ({text})"
    return text


def machine_tag(device: str = "cpu") -> str:
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu-{os.cpu_count()}core"
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-")


def environment(device: str = "cpu") -> dict[str, object]:
    """What a results .md records about the run (the CSV carries machine, torch, date)."""
    return {
        "machine": machine_description(device),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
    }


def _fmt(v: object) -> object:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return "" if v is None else v


def make_row(**fields) -> dict[str, object]:
    """A row of SCHEMA; unknown keys are an error, missing ones blank.  Fills gbps and
    roofline_fraction from bytes, median_s and roofline_gbps, and machine/torch/date."""
    unknown = set(fields) - set(SCHEMA)
    if unknown:
        raise KeyError(f"not in the schema: {sorted(unknown)}")
    f = dict(fields)
    f.setdefault("machine", machine_description(f.get("device", "cpu")))
    f.setdefault("torch", torch.__version__)
    f.setdefault("date", dt.date.today().isoformat())
    f.setdefault("threads", torch.get_num_threads())
    if f.get("bytes") and f.get("median_s") and "gbps" not in f:
        f["gbps"] = f["bytes"] / f["median_s"] / 1e9
    if f.get("gbps") and f.get("roofline_gbps") and "roofline_fraction" not in f:
        f["roofline_fraction"] = f["gbps"] / f["roofline_gbps"]
    return {k: _fmt(f.get(k)) for k in SCHEMA}


def add_ratios(rows: list[dict], baseline: str, keys=("benchmark", "op", "case", "dtype", "numel", "tensors")) -> None:
    """Set baseline_provider and ratio_vs_baseline (baseline median / own median) for
    each row that has a row of provider ``baseline`` with the same ``keys``."""
    base = {tuple(r[k] for k in keys): float(r["median_s"]) for r in rows
            if r["provider"] == baseline and r["median_s"] not in ("", None)}  # fmt: skip
    for r in rows:
        b = base.get(tuple(r[k] for k in keys))
        if b is not None and r["median_s"] not in ("", None):
            r["baseline_provider"] = baseline
            r["ratio_vs_baseline"] = _fmt(b / float(r["median_s"]))


# --------------------------------------------------------------------- CSV

IDENTITY = ("benchmark", "op", "case", "provider", "device", "dtype", "numel", "tensors", "threads", "machine")


def write_csv(path: Path | str, rows: list[dict], merge: bool = True) -> Path:
    """Write ``rows`` to ``path``.  With ``merge``, rows already there with another
    identity (IDENTITY columns) are kept, so every script can add to one results CSV;
    a row with the same identity is replaced by the new measurement."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: _fmt(r.get(k)) for k in SCHEMA} for r in rows]
    kept = []
    if merge and path.exists():
        new = {tuple(str(r[k]) for k in IDENTITY) for r in rows}
        kept = [r for r in read_csv(path) if tuple(r[k] for k in IDENTITY) not in new]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCHEMA)
        w.writeheader()
        w.writerows(kept + rows)
    return path


def read_csv(path: Path | str) -> list[dict]:
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != SCHEMA:
            raise ValueError(f"{path}: not the benchmark schema (columns {reader.fieldnames})")
        return list(reader)
