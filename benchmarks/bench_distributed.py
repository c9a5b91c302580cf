"""Cost of a distributed meta step: ``meta_step()`` time vs flat-buffer size, for 1 and 2
processes (gloo on the CPU here; NCCL on GPUs when ``--backend nccl``), with the share
spent in the all-reduce.

    python benchmarks/bench_distributed.py [--sizes 1e4 1e5 1e6 4e6] [--worlds 1 2] [--repeats 20]

Writes ``benchmarks/results/distributed_<backend>.csv`` and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(fn, repeats, device):
    times = []
    for _ in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def _worker(rank, world, port, backend, sizes, repeats, out):
    from reptile_fused import ReptileOptimizer

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    for size in sizes:
        param = torch.nn.Parameter(torch.randn(size, device=device))
        opt = ReptileOptimizer([param], lr=0.1, meta_lr=0.5)
        flat = opt._flats[0]

        def meta_step():
            with opt.task():
                pass
            opt.meta_step()

        def task_only():
            with opt.task():
                pass
            opt._tasks_done = 0  # drop the task again: only the task() cost is timed here

        def all_reduce_only():
            opt._sync.all_reduce_sum_(flat.acc_ext)

        total = _median_ms(meta_step, repeats, device)
        task = _median_ms(task_only, repeats, device)
        reduce_ms = _median_ms(all_reduce_only, repeats, device)
        rows.append((size, total - task, reduce_ms))
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 4e6])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes]
    machine = f"{platform.machine()}, {os.cpu_count()} cores" if args.backend == "gloo" else torch.cuda.get_device_name(0)
    records = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.start_processes(_worker, args=(world, _port(), args.backend, sizes, args.repeats, out),
                               nprocs=world, join=True, start_method="spawn")
            for size, step_ms, reduce_ms in torch.load(out):
                records.append((world, size, step_ms, reduce_ms))
    print(f"{args.backend} on {machine}; torch {torch.__version__}")
    print(f"{'procs':>5} {'P':>10} {'meta_step ms':>13} {'all-reduce ms':>14} {'share':>6}")
    for world, size, step_ms, reduce_ms in records:
        share = reduce_ms / step_ms if world > 1 and step_ms > 0 else 0.0
        print(f"{world:>5} {size:>10} {step_ms:>13.3f} {reduce_ms:>14.3f} {share:>6.0%}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distributed_{args.backend}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["processes", "elements", "meta_step_ms", "all_reduce_ms", "all_reduce_share", "backend", "machine", "torch"])
        for world, size, step_ms, reduce_ms in records:
            share = reduce_ms / step_ms if world > 1 and step_ms > 0 else 0.0
            w.writerow([world, size, f"{step_ms:.4f}", f"{reduce_ms:.4f}", f"{share:.3f}", args.backend, machine, torch.__version__])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for world in args.worlds:
            pts = [(s, m, r) for w, s, m, r in records if w == world]
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"meta_step, {world} proc")
            if world > 1:
                ax.loglog([p[0] for p in pts], [p[2] for p in pts], "x--", label=f"all-reduce alone, {world} proc")
        ax.set_xlabel("flat buffer elements (fp32)")
        ax.set_ylabel("median ms")
        ax.set_title(f"Distributed meta step ({args.backend}, {machine})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no chart")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
