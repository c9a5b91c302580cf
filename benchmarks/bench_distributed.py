"""Cost of a distributed meta step: ``meta_step()`` time vs flat-buffer size, for 1 and 2
processes (gloo on the CPU here; NCCL on GPUs when ``--backend nccl``), with the share
spent in the all-reduce.

    python benchmarks/bench_distributed.py [--sizes 1e4 1e5 1e6 4e6] [--worlds 1 2] [--repeats 20]

Writes rows of the harness schema (benchmarks/harness.py) into --out (default
``benchmarks/results/benchmarks.csv``; rows of other runs stay) and
``distributed_<backend>.png`` beside it.  Rounds interleave meta_step, task-only and
all-reduce calls, with a barrier around each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness as h  # noqa: E402
import plot  # noqa: E402


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, sizes, repeats, out):
    from reptile_fused import ReptileOptimizer

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def barrier():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    # One call per sample on every rank (a rank-local batch size could differ and hang
    # the collective); the barrier makes a sample end when the slowest rank is done.
    timer = h.Timer(device.type, repeats, sync=barrier)
    results = []
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

        s = timer.samples({"meta_step": meta_step, "task": task_only, "all_reduce": all_reduce_only},
                          calls=1, warmup=3)  # fmt: skip
        # meta_step() alone: the task's cost subtracted round by round (same round, same load).
        step = [a - b for a, b in zip(s["meta_step"], s["task"])]
        results.append((size, h.summary(step), h.summary(s["all_reduce"])))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 4e6])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (median over them)")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--out", type=Path, default=h.RESULTS / "benchmarks.csv",
                        help="CSV path (default results/benchmarks.csv; rows of other runs stay)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes]
    device = "cpu" if args.backend == "gloo" else "cuda"
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.start_processes(_worker, args=(world, _port(), args.backend, sizes, args.repeats, out),
                               nprocs=world, join=True, start_method="spawn")
            for size, step, reduce in torch.load(out):
                common = dict(benchmark="distributed", case=f"{world} process(es)", provider=args.backend,
                              device=device, dtype="float32", numel=size, tensors=1, threads=1)  # fmt: skip
                share = reduce["median_s"] / step["median_s"] if world > 1 and step["median_s"] > 0 else 0.0
                rows.append(h.make_row(**common, op="meta_step", **step, metric="all_reduce_share", value=share,
                                       note="meta_step() minus the task() cost, per round"))  # fmt: skip
                rows.append(h.make_row(**common, op="all_reduce", **reduce,
                                       note="all-reduce of the accumulator alone" + ("" if world > 1 else
                                                                                     " (one process: a no-op)")))
    print(f"{args.backend} on {h.machine_description(device)}; torch {torch.__version__}")
    print(f"{'procs':>14} {'P':>10} {'meta_step ms':>13} {'all-reduce ms':>14} {'share':>6}")
    for step, reduce in zip(rows[::2], rows[1::2]):
        print(f"{step['case']:>14} {step['numel']:>10} {float(step['median_s']) * 1e3:>13.3f} "
              f"{float(reduce['median_s']) * 1e3:>14.3f} {float(step['value']):>6.0%}")
    path = h.write_csv(args.out, rows)
    png = plot.plot_distributed(rows, path.parent / f"distributed_{args.backend}.png",
                                f"Distributed meta step ({args.backend}, {h.machine_description(device)})")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
