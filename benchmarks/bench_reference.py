"""Baseline: the seed sketch's per-parameter loops vs the flat reference path.

Times (a) the meta update and (b) one inner SGD step on a model with many parameter
tensors, for the seed's code and for ``ReptileOptimizer(backend="reference")`` (and the
fused backend, when the extension is built, to show the kernels beat this baseline).
Medians over repeats; prints a table and writes ``benchmarks/results/reference_<device>.csv``.
This is the baseline the fused kernels must beat.

    python benchmarks/bench_reference.py [--layers 60] [--width 256] [--repeats 50] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from reptile_fused import ReptileOptimizer, available_backends, get_backend

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_model(layers, width, device):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)


def fill_grads(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def fused_backend(device):
    """The fastest non-reference backend for ``device``, or None (the extension not built)."""
    name = available_backends(device)[0]
    return None if name == "reference" else get_backend(name, device)


def bench(layers, width, repeats, device):
    rows = []
    n_tensors = 2 * layers
    model = make_model(layers, width, device)
    n_params = sum(p.numel() for p in model.parameters())

    # (a) meta update, seed style: clone θ per parameter, then interpolate per parameter.
    original = {name: p.detach().clone() for name, p in model.named_parameters()}

    def seed_meta_update():
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.data = original[name] + 0.1 * (p.data - original[name])

    seed_meta = median_ms(seed_meta_update, device, repeats)

    # (a) meta update, flat reference: one op over the flat buffer.
    model = make_model(layers, width, device)
    opt = ReptileOptimizer(model.parameters(), lr=0.01, meta_lr=0.1, backend="reference")
    with opt.task():
        pass
    flat = opt._flats[0]

    def flat_meta_update():
        flat.backend.meta_update_(flat.buffer.data, flat.anchor, flat.acc, 0.1, 1)

    flat_meta = median_ms(flat_meta_update, device, repeats)
    rows.append(("meta_update", "seed per-parameter loop", seed_meta))
    rows.append(("meta_update", "flat reference", flat_meta))
    fused = fused_backend(device)
    if fused is not None:
        def fused_meta_update():
            fused.meta_update_(flat.buffer.data, flat.anchor, flat.acc, 0.1, 1)

        rows.append(("meta_update", f"flat {fused.__name__.rsplit('.', 1)[-1]} (fused)", median_ms(fused_meta_update, device, repeats)))

    # (b) inner SGD step with momentum.
    model = make_model(layers, width, device)
    fill_grads(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=False)
    rows.append(("sgd_step", "torch.optim.SGD for-loop (seed)", median_ms(sgd.step, device, repeats)))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    rows.append(("sgd_step", "torch.optim.SGD foreach", median_ms(sgd.step, device, repeats)))
    model = make_model(layers, width, device)
    opt = ReptileOptimizer(model.parameters(), lr=0.01, momentum=0.9, backend="reference")
    fill_grads(model)
    rows.append(("sgd_step", "ReptileOptimizer reference", median_ms(opt.step, device, repeats)))
    if fused is not None:
        model = make_model(layers, width, device)
        opt = ReptileOptimizer(model.parameters(), lr=0.01, momentum=0.9, backend="auto")
        fill_grads(model)
        rows.append(("sgd_step", f"ReptileOptimizer {opt.backends[0]} (fused)", median_ms(opt.step, device, repeats)))
    return [(op, impl, ms, n_tensors, n_params) for op, impl, ms in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=60, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = bench(args.layers, args.width, args.repeats, device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    baseline = {op: ms for op, impl, ms, *_ in rows if "seed" in impl}
    print(f"device: {device} ({machine}); torch {torch.__version__}")
    print(f"{'op':<12} {'implementation':<34} {'median ms':>10} {'vs seed':>8}")
    for op, impl, ms, n_tensors, n_params in rows:
        print(f"{op:<12} {impl:<34} {ms:>10.3f} {baseline[op] / ms:>7.2f}x")
    print(f"model: {rows[0][3]} tensors, {rows[0][4]:,} parameters")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"reference_{device.type}.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "implementation", "median_ms", "speedup_vs_seed", "tensors", "parameters", "device", "machine", "torch"])
        for op, impl, ms, n_tensors, n_params in rows:
            w.writerow([op, impl, f"{ms:.4f}", f"{baseline[op] / ms:.3f}", n_tensors, n_params, device, machine, torch.__version__])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
