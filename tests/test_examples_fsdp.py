"""examples/fsdp_transformer.py under torchrun (gloo, 127.0.0.1), tiny settings.

The 1-D FSDP run over 2 ranks must reproduce the unsharded run's held-out losses (the same
tasks, rows split within the shard group, to float32 rounding), meta-training must lower
the post-adaptation loss, and the report must carry its fields.  The example's 2 x 2
tasks x shards mode runs in benchmarks/bench_fsdp.py; the library's tasks x shards path is
checked against one process in tests/test_fsdp.py (a third torchrun here would add some
13 s of process start-up to every test run).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_distributed import free_port

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp_transformer.py"
TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--seq-len", "4", "--rows", "4", "--meta-iters", "8",
        "--meta-batch", "3", "--inner-steps", "3", "--eval-steps", "5", "--eval-tasks", "2", "--log-every", "4",
        "--lr", "0.05"]  # fmt: skip
FIELDS = {"world_size", "mesh", "sharded", "parameters", "config", "iteration_seconds", "median_iteration_seconds",
          "tasks_per_s", "held_out_loss", "loss_before_meta_training", "loss_after_meta_training", "bytes_per_rank",
          "max_rss_bytes_per_rank"}  # fmt: skip
BYTES = {"parameters", "gradients", "mirror", "meta_gradient", "anchor", "task_sum", "inner_state", "optimizer", "total"}


def torchrun(nproc: int, report: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(EXAMPLE), *TINY, "--report", str(report), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done:") == 1, done.stdout  # rank 0 alone prints
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """World size 1, no FSDP, in this process (no torch import to wait for)."""
    spec = importlib.util.spec_from_file_location("fsdp_transformer_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = tmp_path_factory.mktemp("unsharded") / "one.json"
    threads = torch.get_num_threads()
    try:
        assert example.main([*TINY, "--report", str(report)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(report.read_text())


def check_report(report: dict, world: int, mesh: list) -> None:
    assert FIELDS <= set(report), FIELDS - set(report)
    assert report["world_size"] == world and report["mesh"] == mesh and report["sharded"] == (world > 1)
    assert len(report["iteration_seconds"]) == 8 - 1  # the first meta-iteration is a warm-up
    assert report["tasks_per_s"] > 0
    assert report["loss_after_meta_training"] < 0.85 * report["loss_before_meta_training"], report["held_out_loss"]
    assert len(report["bytes_per_rank"]) == len(report["max_rss_bytes_per_rank"]) == world
    for part in report["bytes_per_rank"]:
        assert BYTES <= set(part) and part["total"] == part["parameters"] + part["gradients"] + part["optimizer"]


def test_unsharded_run_learns(unsharded):
    check_report(unsharded, 1, [1, 1])
    assert unsharded["bytes_per_rank"][0]["mirror"] == 0  # the parameters are views of the flat buffer


def test_fsdp_two_ranks_matches_unsharded(tmp_path, unsharded):
    report = torchrun(2, tmp_path / "two.json")
    check_report(report, 2, [1, 2])
    for key, loss in unsharded["held_out_loss"].items():
        assert report["held_out_loss"][key] == pytest.approx(loss, rel=1e-4), key
    whole, halves = unsharded["bytes_per_rank"][0], report["bytes_per_rank"]
    for h in halves:  # about half of every parameter (uneven rows: not exactly)
        assert h["parameters"] < 0.6 * whole["parameters"] and h["anchor"] < 0.6 * whole["anchor"]
        assert h["mirror"] > 0 and h["task_sum"] == h["anchor"]  # 1-D FSDP: no count slot, no task all-reduce
