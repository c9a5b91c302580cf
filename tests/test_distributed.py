"""Distributed meta-batches on gloo (CPU), processes on 127.0.0.1, bounded in time."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reptile_fused import ReptileOptimizer
from reptile_fused.distributed import LayoutMismatchError, rank_generator, shard
from reptile_loops import make_tasks, train

ITERATIONS = 3
TASKS_PER_META_BATCH = 4
CONFIGS = {
    "sgd": dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.7),
    # Rank 0 adapts 3 tasks, rank 1 one: the mean must use the global count.
    "sgd_uneven": dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.5),
    # Carried inner state is per rank, so world-size independence needs per-task state.
    "sgd_momentum": dict(inner_optimizer="sgd", lr=0.05, meta_lr=0.7, momentum=0.9, reset_inner_state="task"),
    "adam": dict(inner_optimizer="adam", lr=0.01, meta_lr=1.0, betas=(0.0, 0.999), reset_inner_state="task"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))


def all_tasks():
    return make_tasks(ITERATIONS, TASKS_PER_META_BATCH, 3, seed=7, rows=5)


def _init(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=__import__("datetime").timedelta(seconds=30),
    )


def _my_tasks(config_name, rank, world):
    if config_name == "sgd_uneven":
        return [tasks[:3] if rank == 0 else tasks[3:] for tasks in all_tasks()]
    return [shard(tasks, rank, world) for tasks in all_tasks()]


def _worker_train(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        for config_name, config in CONFIGS.items():
            torch.manual_seed(1000 + rank)  # different init per rank: the optimizer must broadcast rank 0's θ
            model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
            if rank == 0:
                model.load_state_dict(make_model().state_dict())
            opt = ReptileOptimizer(model.parameters(), **config)
            train(model, opt, _my_tasks(config_name, rank, world))
            path = os.path.join(out_dir, f"{config_name}_{rank}.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    finally:
        _finish()


def _worker_mismatch(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        model = make_model(width=8 if rank == 0 else 9)
        import torch._dynamo  # noqa: F401  torch.optim imports it on first use: seconds on a busy machine

        dist.barrier()  # time the check itself, not the other rank's start-up
        start = time.monotonic()
        try:
            ReptileOptimizer(model.parameters(), lr=0.1)
        except LayoutMismatchError as exc:
            with open(os.path.join(out_dir, f"mismatch_{rank}.txt"), "w") as f:
                f.write(f"{time.monotonic() - start:.3f}\n{exc}")
    finally:
        _finish()


def _finish():
    # Let every rank finish its collectives before any tears the group down: a rank
    # leaving early can abort its peer's gloo threads.
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world, *args, start_method="forkserver"):
    # Children fork from one server that imported torch and the library once per test
    # session (a fresh interpreter per child, as "spawn" starts, costs seconds of imports
    # each); the server has run nothing, so forking from it is as clean as spawning.
    # Ranks that use CUDA are spawned: a driver touched before a fork is not fork-safe.
    mp.set_forkserver_preload(["torch", "torch.distributed", "reptile_fused"])
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method=start_method)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One 2-process gloo run for every config (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("dist")
    spawn(_worker_train, 2, str(out))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_equal_one_process(two_process_run, name):
    expected = make_model()
    train(expected, ReptileOptimizer(expected.parameters(), **CONFIGS[name], process_group=False), all_tasks())
    results = [torch.load(two_process_run / f"{name}_{r}.pt", weights_only=True)["model"] for r in range(2)]
    for key, value in expected.state_dict().items():
        assert torch.equal(results[1][key], results[0][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(results[0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_layout_mismatch_raises_on_every_rank_quickly(tmp_path):
    started = time.monotonic()
    spawn(_worker_mismatch, 2, str(tmp_path))
    for rank in range(2):
        elapsed, message = (tmp_path / f"mismatch_{rank}.txt").read_text().split("\n", 1)
        assert float(elapsed) < 5.0
        assert "differs between ranks" in message
    assert time.monotonic() - started < 60


def test_checkpoint_from_two_processes_resumes_in_one(two_process_run):
    name = "adam"
    saved = torch.load(two_process_run / f"{name}_0.pt", weights_only=True)
    model = make_model()
    model.load_state_dict(saved["model"])
    opt = ReptileOptimizer(model.parameters(), **CONFIGS[name])
    opt.load_state_dict(saved["opt"])
    train(model, opt, all_tasks()[:1])  # continues without error, from the distributed weights

    expected = make_model()
    opt2 = ReptileOptimizer(expected.parameters(), **CONFIGS[name])
    train(expected, opt2, all_tasks() + all_tasks()[:1])
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shard_and_rank_generator():
    items = list(range(10))
    shards = [shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard([1], 1, 2) == []
    a = torch.rand(3, generator=rank_generator(5, 0))
    assert torch.equal(a, torch.rand(3, generator=rank_generator(5, 0)))
    assert not torch.equal(a, torch.rand(3, generator=rank_generator(5, 1)))


def _run_train(out, *launcher):
    import subprocess
    import sys

    cmd = [sys.executable, *launcher, "-m", "reptile_fused", "train", "--dataset", "sine", "--out", str(out),
           "--meta-iters", "4", "--meta-batch", "4", "--inner-iters", "3", "--inner-optimizer", "sgd",
           "--eval-interval", "2", "--checkpoint-interval", "2", "--threads", "1", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_cli_train_under_torchrun_equals_one_process(tmp_path):
    port = free_port()
    two = _run_train(tmp_path / "two", "-m", "torch.distributed.run", "--nproc_per_node=2",
                     "--master_addr=127.0.0.1", f"--master_port={port}")
    _run_train(tmp_path / "one")
    a = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Rank 0 alone logs: one header and one row per evaluation, no duplicates.
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2, rows
    assert two.stdout.count("Training sine waves") == 1, two.stdout
