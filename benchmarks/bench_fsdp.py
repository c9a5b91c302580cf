"""Reptile on an FSDP2-sharded transformer: tasks per second and bytes per rank against
the unsharded model, by running ``examples/fsdp_transformer.py`` for each layout.

    python benchmarks/bench_fsdp.py [--rounds 2] [--meta-iters 8] [--width 128] [--depth 2]

Layouts: world size 1 (unsharded, no FSDP), 2 (1-D FSDP over both ranks) and 4 (a 2 x 2
tasks x shards mesh), each under ``torch.distributed.run`` on 127.0.0.1 with gloo, one
torch thread per process; the rounds interleave the layouts.  Each run reports (see the
example's docstring) meta-batch tasks per second from the median time of its timed
meta-iterations (all but the first, the slowest rank's time per iteration, evaluations
excluded), and per rank the bytes of parameters, gradients and optimizer buffers counted
from the tensors, plus the process's peak RSS.

Writes one row per layout, of the harness schema (``benchmark=fsdp``: ``value`` tasks/s,
``median_s`` the median over rounds of each run's median meta-iteration, ``bytes`` the
largest rank's bytes, ``ratio_vs_baseline`` the speed against the unsharded run), into
``<out>/benchmarks.csv`` (default ``benchmarks/results``), and the runs' JSON reports into
``<out>/fsdp_cpu/``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "fsdp_transformer.py"
LAYOUTS = {1: None, 2: None, 4: "2,2"}  # world size -> --mesh (None: the example's default)
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, report: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={_port()}", str(EXAMPLE), "--width", str(args.width), "--depth", str(args.depth),
           "--meta-iters", str(args.meta_iters), "--log-every", str(args.meta_iters),
           "--inner-optimizer", args.inner_optimizer, "--lr", str(args.lr), "--report", str(report)]  # fmt: skip
    if LAYOUTS[world]:
        cmd += ["--mesh", LAYOUTS[world]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise SystemExit(f"world size {world} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(report.read_text())


PROVIDERS = {1: "unsharded", 2: "fsdp 1-D, 2 ranks", 4: "fsdp tasks x shards 2x2"}


def rows_for(world: int, reports: list[dict], args) -> dict:
    """One row of the harness schema for a layout's rounds: the median over rounds of each
    run's median meta-iteration time, and the largest rank's bytes."""
    seconds = [r["median_iteration_seconds"] for r in reports]
    first = reports[0]
    cfg = first["config"]
    worst = max(first["bytes_per_rank"], key=lambda b: b["total"])
    oversubscribed = world > (os.cpu_count() or 1)
    median_s = harness.median(seconds)
    return harness.make_row(
        benchmark="fsdp", op="meta_iteration",
        case=(f"transformer width {cfg['width']}, depth {cfg['depth']}, meta-batch {cfg['meta_batch']}, "
              f"{cfg['inner_steps']} inner {args.inner_optimizer} steps"),
        provider=PROVIDERS[world], device="cpu", dtype="float32", numel=first["parameters"],
        threads=1, rounds=len(reports), median_s=median_s,
        p20_s=harness.quantile(seconds, 0.2), p80_s=harness.quantile(seconds, 0.8), bytes=worst["total"],
        metric="tasks_per_s", value=cfg["meta_batch"] / median_s,
        peak_mib=max(max(r["max_rss_bytes_per_rank"]) for r in reports) / 2**20,
        note=(f"world size {world}, mesh {'x'.join(map(str, first['mesh']))}"
              + (", oversubscribed" if oversubscribed else "")
              + "; bytes = the largest rank's parameters, gradients and optimizer buffers ("
              + ", ".join(f"{k} {worst[k]}" for k in ("parameters", "gradients", "anchor", "task_sum", "mirror",
                                                       "meta_gradient", "inner_state"))
              + "); peak_mib = the largest process RSS (mostly torch itself); no roofline: whole "
              "meta-iterations of several processes, gloo on 127.0.0.1"),
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--meta-iters", type=int, default=8, help="per run; all but the first are timed")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--inner-optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--worlds", type=int, nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.meta_iters < 4:
        p.error("--meta-iters must be >= 4: medians over at least 3 timed meta-iterations")
    reports_dir = args.out / "fsdp_cpu"
    reports_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[int, list[dict]] = {w: [] for w in args.worlds}
    for round_ in range(args.rounds):
        for world in args.worlds:  # the rounds interleave the layouts
            report = run(world, reports_dir / f"world{world}_round{round_}.json", args)
            reports[world].append(report)
            print(f"round {round_} world {world}: {report['tasks_per_s']:.2f} tasks/s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    rows = [rows_for(world, reps, args) for world, reps in reports.items()]
    harness.add_ratios(rows, "unsharded")
    path = harness.write_csv(args.out / "benchmarks.csv", rows)
    for r in rows:
        print(f"{r['provider']}: {float(r['value']):.2f} tasks/s ({r['ratio_vs_baseline'] or 1}x unsharded), "
              f"{r['bytes']} bytes per rank")
    print(f"wrote {path} and {reports_dir}/")


if __name__ == "__main__":
    main()
