"""Benchmark of the flat-buffer ops: the fused C++/CUDA kernels against the reference
ops and PyTorch's best existing primitives, with the machine's copy bandwidth,
measured in the same run, as the roofline.

    python benchmarks/bench_ops.py                      # CPU, full sweep (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --device cuda        # GPU sweep (adds P = 6.4e7)
    python benchmarks/bench_ops.py --quick              # fewer repeats and sizes

Writes ``ops_<device>_<date>.csv`` (one row per measurement), ``.png`` (charts) and
``.md`` (the targets of issue 3 with the measured numbers) under ``--out``.

Timing: every variant of a case runs once per round, rounds interleave the variants
(so background load hits them alike), and each reported time is the median over the
rounds of the per-call time of a batch of calls.  Ratios compare medians from the
same run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reptile_fused import reference as ref  # noqa: E402
from reptile_fused.backends import cpp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: str, rounds: int, min_batch_s: float):
        self.device = device
        self.rounds = rounds
        self.min_batch_s = min_batch_s

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _batch(self, fn, calls: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls

    def calls_for(self, fn) -> int:
        """Calls per batch so a batch lasts about min_batch_s (after a warm-up call)."""
        fn()
        one = self._batch(fn, 1)
        return max(1, min(1000, int(self.min_batch_s / max(one, 1e-7))))

    def compare(self, variants: dict, copy_numel: int | None = None) -> dict[str, float]:
        """Median seconds per call for each variant, rounds interleaved.  With
        ``copy_numel``, a copy of that many fp32 elements runs in the same rounds (key
        ``"copy"``): the roofline under the same background load as the variants."""
        if copy_numel is not None:
            src = torch.randn(copy_numel, device=self.device)
            dst = torch.empty_like(src)
            variants = {**variants, "copy": lambda: dst.copy_(src)}
        calls = {name: self.calls_for(fn) for name, fn in variants.items()}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(self.rounds):
            for name, fn in variants.items():
                samples[name].append(self._batch(fn, calls[name]))
        return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------- cases


def _rand(n, device, dtype=torch.float32):
    return torch.randn(n, device=device, dtype=dtype)


def bench_batched(timer: Timer, device: str, sizes, n: int):
    rows = []
    for P in sizes:
        theta, tasks = _rand(P, device), _rand(n * P, device).view(n, P)
        eps = 0.5
        variants = {
            "reference": lambda: ref.batched_meta_update_(theta, tasks, eps, write_back=False),
            "torch mean+lerp_": lambda: theta.lerp_(tasks.mean(0), eps),
            "fused": lambda: cpp.batched_meta_update_(theta, tasks, eps, write_back=False),
            "fused+write_back": lambda: cpp.batched_meta_update_(theta, tasks, eps, write_back=True),
        }
        times = timer.compare(variants, copy_numel=P)
        copy_bw = 2 * 4 * P / times.pop("copy")
        for name, t in times.items():
            moved = (2 * n + 2 if name == "fused+write_back" else n + 2) * 4 * P
            rows.append(dict(op="batched_meta_update_", impl=name, numel=P, tensors=1, n=n, seconds=t, bytes=moved,
                             copy_GBps=copy_bw / 1e9))
        del theta, tasks
    return rows


def _model(total: int, count: int, device: str):
    """``count`` parameters of roughly equal size summing to ``total`` elements, as views
    into one flat buffer (the layout ReptileOptimizer builds), with gradients."""
    sizes = [total // count + (1 if i < total % count else 0) for i in range(count)]
    flat, flat_grad = _rand(total, device), _rand(total, device)
    params, start = [], 0
    for s in sizes:
        p = flat[start : start + s]
        p.grad = flat_grad[start : start + s]
        params.append(p)
        start += s
    return flat, flat_grad, params


def bench_sgd(timer: Timer, device: str, totals, counts):
    rows = []
    for total in totals:
        for count in counts:
            if count > total:
                continue
            flat, grad, params = _model(total, count, device)
            buf = torch.zeros_like(flat)
            kw = dict(lr=1e-3, momentum=0.9)
            opt_fused = torch.optim.SGD(params, fused=True, **kw)
            opt_foreach = torch.optim.SGD(params, foreach=True, **kw)
            variants = {
                "reference": lambda: ref.sgd_step_(flat, grad, buf, 1e-3, momentum=0.9),
                "torch SGD fused": opt_fused.step,
                "torch SGD foreach": opt_foreach.step,
                "fused": lambda: cpp.sgd_step_(flat, grad, buf, 1e-3, momentum=0.9),
            }
            times = timer.compare(variants, copy_numel=total)
            copy_bw = 2 * 4 * total / times.pop("copy")
            for name, t in times.items():
                rows.append(dict(op="sgd_step_ momentum", impl=name, numel=total, tensors=count, n="",
                                 seconds=t, bytes=5 * 4 * total, copy_GBps=copy_bw / 1e9))
            del flat, grad, params, buf, opt_fused, opt_foreach
    return rows


def bench_adam(timer: Timer, device: str, totals, counts):
    rows = []
    for total in totals:
        for count in counts:
            flat, grad, params = _model(total, count, device)
            m, v = torch.zeros_like(flat), torch.zeros_like(flat)
            opt_fused = torch.optim.Adam(params, lr=1e-3, fused=True)
            opt_foreach = torch.optim.Adam(params, lr=1e-3, foreach=True)
            variants = {
                "reference": lambda: ref.adam_step_(flat, grad, m, v, None, 10, 1e-3),
                "torch Adam fused": opt_fused.step,
                "torch Adam foreach": opt_foreach.step,
                "fused": lambda: cpp.adam_step_(flat, grad, m, v, None, 10, 1e-3),
            }
            times = timer.compare(variants, copy_numel=total)
            copy_bw = 2 * 4 * total / times.pop("copy")
            for name, t in times.items():
                rows.append(dict(op="adam_step_", impl=name, numel=total, tensors=count, n="", seconds=t,
                                 bytes=7 * 4 * total, copy_GBps=copy_bw / 1e9))
            del flat, grad, params, m, v, opt_fused, opt_foreach
    return rows


def bench_reptile(timer: Timer, device: str, sizes, counts):
    """task_end_ and meta_update_ on one flat buffer, and the per-tensor foreach
    equivalents over `count` parameter tensors."""
    rows = []
    for P in sizes:
        for count in counts:
            flat, _, params = _model(P, count, device)
            anchor, acc = _rand(P, device), _rand(P, device)
            anchors = [anchor[p.storage_offset() - flat.storage_offset():][: p.numel()] for p in params]
            accs = [acc[p.storage_offset() - flat.storage_offset():][: p.numel()] for p in params]

            def foreach_task_end():
                torch._foreach_add_(accs, params)
                torch._foreach_copy_(params, anchors)

            def foreach_meta_update():
                torch._foreach_copy_(params, anchors)
                torch._foreach_lerp_(params, torch._foreach_div(accs, 3.0), 0.5)
                torch._foreach_zero_(accs)

            te = {
                "reference": lambda: ref.task_end_(flat, anchor, acc),
                "torch foreach": foreach_task_end,
                "fused": lambda: cpp.task_end_(flat, anchor, acc),
            }
            mu = {
                "reference": lambda: ref.meta_update_(flat, anchor, acc, 0.5, 3),
                "torch foreach_lerp_": foreach_meta_update,
                "fused": lambda: cpp.meta_update_(flat, anchor, acc, 0.5, 3),
            }
            for op, variants, nbytes in (("task_end_", te, 5 * 4 * P), ("meta_update_", mu, 4 * 4 * P)):
                times = timer.compare(variants, copy_numel=P)
                copy_bw = 2 * 4 * P / times.pop("copy")
                for name, t in times.items():
                    rows.append(dict(op=op, impl=name, numel=P, tensors=count, n="", seconds=t, bytes=nbytes,
                                     copy_GBps=copy_bw / 1e9))
            del flat, params, anchor, acc, anchors, accs
    return rows


def kernel_launches(device: str) -> dict[str, int]:
    """CUDA kernels launched by one call of each fused op on a 200-tensor model."""
    from torch.profiler import ProfilerActivity, profile

    flat, grad, _ = _model(10**6, 200, device)
    m, v, acc, anchor = (torch.zeros_like(flat) for _ in range(4))
    tasks = _rand(5 * 10**6, device).view(5, -1)
    calls = {
        "sgd_step_": lambda: cpp.sgd_step_(flat, grad, m, 0.1, momentum=0.9),
        "adam_step_": lambda: cpp.adam_step_(flat, grad, m, v, None, 3, 1e-3),
        "task_end_": lambda: cpp.task_end_(flat, anchor, acc),
        "meta_update_": lambda: cpp.meta_update_(flat, anchor, acc, 0.5, 3),
        "batched_meta_update_": lambda: cpp.batched_meta_update_(flat, tasks, 0.5),
    }
    out = {}
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out[name] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


# --------------------------------------------------------------------- output


def machine_tag(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{os.cpu_count()}core"
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-")


def write_csv(path: Path, rows, meta: dict) -> None:
    with path.open("w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=["op", "impl", "numel", "tensors", "n", "seconds", "bytes", "GBps",
                                          "copy_GBps", "roofline_frac"])
        w.writeheader()
        for r in rows:
            w.writerow(r)


def add_bandwidth(rows) -> dict[int, float]:
    """GB/s and fraction of the copy bandwidth measured in the same rounds, per row;
    returns the median copy bandwidth (bytes/s) per size over all cases."""
    for r in rows:
        r["GBps"] = round(r["bytes"] / r["seconds"] / 1e9, 3)
        r["roofline_frac"] = round(r["GBps"] / r["copy_GBps"], 3)
        r["copy_GBps"] = round(r["copy_GBps"], 3)
        r["seconds"] = f"{r['seconds']:.6g}"
    by_size: dict[int, list[float]] = {}
    for r in rows:
        by_size.setdefault(r["numel"], []).append(r["copy_GBps"] * 1e9)
    return {k: statistics.median(v) for k, v in sorted(by_size.items())}


def _t(rows, op, impl, numel, tensors=1):
    for r in rows:
        if r["op"] == op and r["impl"] == impl and r["numel"] == numel and r["tensors"] == tensors:
            return float(r["seconds"]), r
    return None, None


def summary(rows, copy_bw, device: str, meta: dict, launches) -> str:
    lines = [f"# Op benchmark: {meta['machine']} ({meta['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    big = max(r["numel"] for r in rows if r["op"] == "batched_meta_update_")
    f, fr = _t(rows, "batched_meta_update_", "fused", big)
    b, _ = _t(rows, "batched_meta_update_", "torch mean+lerp_", big)
    n = fr["n"]
    if device == "cpu":
        ratio = b / f
        lines.append(f"| batched_meta_update_ n={n}, P={big:.2g} fp32: >= 2x faster than `theta.lerp_(tasks.mean(0), eps)` "
                     f"| {ratio:.2f}x ({f * 1e3:.1f} ms vs {b * 1e3:.1f} ms) | {'yes' if ratio >= 2 else 'NO'} |")
        lines.append(f"| same: >= 80% of copy-bandwidth roofline for (n+2)*4*P bytes "
                     f"| {fr['roofline_frac'] * 100:.0f}% ({fr['GBps']:.1f} GB/s vs copy {fr['copy_GBps']:.1f} GB/s "
                     "in the same rounds) "
                     f"| {'yes' if fr['roofline_frac'] >= 0.8 else 'NO'} |")
        sgd = [r for r in rows if r["op"] == "sgd_step_ momentum" and r["tensors"] >= 200]
        for total in sorted({r["numel"] for r in sgd}):
            for count in sorted({r["tensors"] for r in sgd if r["numel"] == total}):
                f, _ = _t(rows, "sgd_step_ momentum", "fused", total, count)
                b, _ = _t(rows, "sgd_step_ momentum", "torch SGD fused", total, count)
                ratio = b / f
                lines.append(f"| sgd_step_ momentum, {count} tensors, {total:.2g} elements: >= 1.5x faster than "
                             f"`torch.optim.SGD(momentum=0.9, fused=True)` | {ratio:.2f}x ({f * 1e3:.3f} ms vs "
                             f"{b * 1e3:.3f} ms) | {'yes' if ratio >= 1.5 else 'NO'} |")
    else:
        for op in ("batched_meta_update_", "sgd_step_ momentum", "adam_step_", "task_end_", "meta_update_"):
            cand = [r for r in rows if r["op"] == op and r["impl"] == "fused" and r["numel"] >= 6.4e7]
            for r in cand:
                lines.append(f"| {op}, P={r['numel']:.2g}, {r['tensors']} tensors: >= 90% of D2D copy bandwidth "
                             f"| {r['roofline_frac'] * 100:.0f}% ({r['GBps']:.0f} GB/s) "
                             f"| {'yes' if r['roofline_frac'] >= 0.9 else 'NO'} |")
        if launches:
            ok = all(v == 1 for v in launches.values())
            lines.append(f"| one kernel launch per op per flat buffer (200-tensor model) | {launches} "
                         f"| {'yes' if ok else 'NO'} |")
    lines += ["", "Copy bandwidth (read + write, median over the cases of a size): "
              + ", ".join(f"{k:.2g}: {v / 1e9:.1f} GB/s" for k, v in sorted(copy_bw.items()))]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows, copy_bw, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for impl in ("reference", "torch mean+lerp_", "fused", "fused+write_back"):
        pts = sorted((r["numel"], float(r["seconds"])) for r in rows
                     if r["op"] == "batched_meta_update_" and r["impl"] == impl)
        ax.plot([p for p, _ in pts], [t * 1e3 for _, t in pts], marker="o", label=impl)
    n = next(r["n"] for r in rows if r["op"] == "batched_meta_update_")
    pts = sorted(copy_bw.items())
    ax.plot([p for p, _ in pts], [(n + 2) * 4 * p / bw * 1e3 for p, bw in pts], "k--", label="roofline (copy bw)")
    ax.set(xscale="log", yscale="log", xlabel="P (elements)", ylabel="ms per call",
           title=f"batched_meta_update_, n={n}, fp32")
    ax.legend(fontsize=8)

    for ax, op, base in ((axes[0][1], "sgd_step_ momentum", "torch SGD fused"), (axes[1][0], "adam_step_",
                                                                                  "torch Adam fused")):
        for impl in sorted({r["impl"] for r in rows if r["op"] == op} - {base}):
            pts = []
            for r in rows:
                if r["op"] == op and r["impl"] == impl:
                    b, _ = _t(rows, op, base, r["numel"], r["tensors"])
                    pts.append((f"{r['numel']:.0e}\n{r['tensors']}t", b / float(r["seconds"])))
            ax.plot([p for p, _ in pts], [s for _, s in pts], marker="o", label=impl)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(yscale="log", ylabel=f"speed-up vs {base}", title=f"{op} (elements / tensors)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)

    ax = axes[1][1]
    for op in ("batched_meta_update_", "sgd_step_ momentum", "adam_step_", "task_end_", "meta_update_"):
        pts = sorted((r["numel"], r["roofline_frac"]) for r in rows
                     if r["op"] == op and r["impl"] == "fused" and r["tensors"] in (1, max_tensors(rows, op)))
        best = {}
        for p, f in pts:
            best[p] = max(best.get(p, 0), f)
        ax.plot(list(best), [v * 100 for v in best.values()], marker="o", label=op)
    ax.axhline(100, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="elements", ylabel="% of copy bandwidth", title="fused kernels vs roofline")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def max_tensors(rows, op):
    return max(r["tensors"] for r in rows if r["op"] == op)


# --------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 9 CPU, 15 CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and rounds (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default=None, help="file name tag (default: the machine and thread count)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's).  On a loaded machine 1 thread is the stable "
                         "measurement: a parallel region waits for its slowest, possibly descheduled, thread")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    reason = cpp.unavailable_reason(torch.device(args.device))
    if reason is not None:
        print(f"the fused backend cannot run on {args.device}: {reason}", file=sys.stderr)
        return 2
    device = args.device
    quick = args.quick
    rounds = args.rounds or (3 if quick else (9 if device == "cpu" else 15))
    timer = Timer(device, rounds, min_batch_s=0.02 if device == "cpu" else 0.005)
    big = [10**4, 10**5, 10**6, 4 * 10**6, 16 * 10**6]
    if device == "cuda":
        big.append(64 * 10**6)
    if quick:
        big = [10**4, 10**6, 16 * 10**6] + ([64 * 10**6] if device == "cuda" else [])
    counts = [1, 20, 200] if not quick else [1, 200]
    model_totals = [10**5, 10**6, 16 * 10**6] if not quick else [10**6, 16 * 10**6]
    if device == "cuda":
        model_totals.append(64 * 10**6)

    started = time.perf_counter()
    meta = {
        "machine": machine_tag(device),
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "extension": cpp.build_info(),
        "rounds": rounds,
        "timing": "median over interleaved rounds of per-call time in a batch of calls",
        "roofline": "fp32 copy_ of the case's element count, timed in the same rounds as the variants",
        "load_average_at_start": os.getloadavg(),
    }
    print(f"bench_ops on {meta['machine']} ({device}), {rounds} rounds", flush=True)
    rows = bench_batched(timer, device, big, n=5)
    print("batched done", flush=True)
    rows += bench_sgd(timer, device, model_totals, counts)
    print("sgd done", flush=True)
    rows += bench_adam(timer, device, model_totals[-2:] if not quick else model_totals[-1:], [1, 200])
    print("adam done", flush=True)
    rows += bench_reptile(timer, device, [10**6, big[-1]], [1, 200])
    copy_bw = add_bandwidth(rows)
    launches = kernel_launches(device) if device == "cuda" else None
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_at_end"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or (meta["machine"] if device == "cuda" else f"{meta['machine']}-{torch.get_num_threads()}thread")
    stem = f"ops_{tag}_{meta['date']}"
    write_csv(args.out / f"{stem}.csv", rows, meta)
    text = summary(rows, copy_bw, device, meta, launches)
    (args.out / f"{stem}.md").write_text(text)
    plot(args.out / f"{stem}.png", rows, copy_bw, f"reptile_fused ops on {meta['machine']} ({meta['date']})")
    print(text)
    print(f"wrote {args.out / stem}.{{csv,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
