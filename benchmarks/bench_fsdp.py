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

Writes one CSV row per run to ``--out`` (default ``benchmarks/results/fsdp_cpu.csv``,
replaced) and the runs' JSON reports to the folder of the same name beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "fsdp_transformer.py"
LAYOUTS = {1: None, 2: None, 4: "2,2"}  # world size -> --mesh (None: the example's default)
COLUMNS = ["date", "cpu", "cores", "torch", "round", "world_size", "mesh", "sharded", "oversubscribed", "width",
           "depth", "seq_len", "rows", "meta_batch", "inner_steps", "inner_optimizer", "parameters",
           "timed_iterations", "median_iteration_s", "tasks_per_s", "param_bytes", "grad_bytes", "optimizer_bytes",
           "mirror_bytes", "meta_gradient_bytes", "anchor_bytes", "task_sum_bytes", "inner_state_bytes",
           "total_bytes", "total_vs_unsharded", "max_rss_mib", "loss_before", "loss_after", "load_before",
           "load_after"]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def row(report: dict, round_: int, unsharded_total: int | None, loads: tuple, args) -> dict:
    # Ranks of one layout differ by FSDP's uneven rows: report the largest.
    worst = max(report["bytes_per_rank"], key=lambda b: b["total"])
    cfg = report["config"]
    return {
        "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "torch": torch.__version__, "round": round_, "world_size": report["world_size"],
        "mesh": "x".join(map(str, report["mesh"])), "sharded": report["sharded"],
        "oversubscribed": report["world_size"] > (os.cpu_count() or 1), "width": cfg["width"], "depth": cfg["depth"],
        "seq_len": cfg["seq_len"], "rows": cfg["rows"], "meta_batch": cfg["meta_batch"],
        "inner_steps": cfg["inner_steps"], "inner_optimizer": args.inner_optimizer,
        "parameters": report["parameters"], "timed_iterations": len(report["iteration_seconds"]),
        "median_iteration_s": f"{report['median_iteration_seconds']:.4f}",
        "tasks_per_s": f"{report['tasks_per_s']:.2f}",
        "param_bytes": worst["parameters"], "grad_bytes": worst["gradients"], "optimizer_bytes": worst["optimizer"],
        "mirror_bytes": worst["mirror"], "meta_gradient_bytes": worst["meta_gradient"],
        "anchor_bytes": worst["anchor"], "task_sum_bytes": worst["task_sum"],
        "inner_state_bytes": worst["inner_state"], "total_bytes": worst["total"],
        "total_vs_unsharded": "" if unsharded_total is None else f"{worst['total'] / unsharded_total:.3f}",
        "max_rss_mib": f"{max(report['max_rss_bytes_per_rank']) / 2**20:.0f}",
        "loss_before": f"{report['loss_before_meta_training']:.4f}",
        "loss_after": f"{report['loss_after_meta_training']:.4f}",
        "load_before": loads[0], "load_after": loads[1],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--meta-iters", type=int, default=8, help="per run; all but the first are timed")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--inner-optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--worlds", type=int, nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "fsdp_cpu.csv")
    args = p.parse_args()
    if args.meta_iters < 4:
        p.error("--meta-iters must be >= 4: medians over at least 3 timed meta-iterations")
    reports = args.out.with_suffix("")
    reports.mkdir(parents=True, exist_ok=True)
    rows, unsharded_total = [], None
    for round_ in range(args.rounds):
        for world in args.worlds:
            before = f"{os.getloadavg()[0]:.2f}"
            report = run(world, reports / f"world{world}_round{round_}.json", args)
            if world == 1:
                unsharded_total = max(b["total"] for b in report["bytes_per_rank"])
            rows.append(row(report, round_, unsharded_total, (before, f"{os.getloadavg()[0]:.2f}"), args))
            print(" ".join(f"{k}={rows[-1][k]}" for k in ("round", "world_size", "mesh", "tasks_per_s", "total_bytes",
                                                           "total_vs_unsharded", "max_rss_mib")), flush=True)  # fmt: skip
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} and {reports}/")


if __name__ == "__main__":
    main()
