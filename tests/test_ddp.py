"""DistributedDataParallel inside ReptileOptimizer.task(): each rank adapts to its own tasks.

One 2-process gloo run (float64, tiny model) trains DDP-wrapped models in every way below;
the parent compares each with the single-process run of the unwrapped model on all tasks.
"""

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import reptile_fused.ddp
from reptile_fused import ReptileOptimizer
from reptile_fused.distributed import shard
from reptile_loops import make_tasks
from test_distributed import spawn

CONFIGS = {
    "sgd": dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.7),
    # Per-task inner state: the result then does not depend on how the tasks are split.
    "adam": dict(inner_optimizer="adam", lr=0.02, meta_lr=1.0, betas=(0.0, 0.999), reset_inner_state="task"),
}
# (config, split, how the loop is written): "auto" is a plain loop over a DDP model,
# "user_no_sync" wraps task bodies (and whole tasks) in ddp.no_sync() itself, "control"
# runs "auto" with the automatic switch patched out (so it must differ), "opt_first"
# builds the optimizer before DDP.
RUNS = {
    "sgd_even": ("sgd", "even", "auto"),
    "sgd_uneven": ("sgd", "uneven", "auto"),
    "adam_uneven": ("adam", "uneven", "auto"),
    "adam_even_opt_first": ("adam", "even", "opt_first"),
    "sgd_user_no_sync": ("sgd", "uneven", "user_no_sync"),
    "sgd_control": ("sgd", "even", "control"),
}
FINE_TUNE_LR = 0.05


class Shift(nn.Module):
    """A layer with a buffer: DDP would broadcast it in its first forward unless told not to."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 4, dtype=torch.float64))

    def forward(self, x):
        return x + self.shift


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), Shift(), nn.Tanh(), nn.Linear(4, 2)).double()


def all_tasks():
    return make_tasks(3, 4, 3, seed=7, dtype=torch.float64, rows=5)


def rank_tasks(split, rank, world):
    if split == "even":
        return [shard(tasks, rank, world) for tasks in all_tasks()]
    # Rank 1 has no task in the first meta-batch (a collective in rank 0's tasks, such as DDP's
    # buffer broadcast, would wait for it in vain), one in the second, three in the third.
    cuts = [4, 3, 1]
    return [tasks[:cut] if rank == 0 else tasks[cut:] for tasks, cut in zip(all_tasks(), cuts)]


def fine_tune_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)


def inner_steps(model, opt, task):
    for x, y in task:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def single_process(config, tasks):
    """The oracle: the unwrapped model adapting every task of every meta-batch in one process."""
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), **CONFIGS[config], process_group=False)
    for meta_batch in tasks:
        for task in meta_batch:
            with opt.task():
                inner_steps(model, opt, task)
        opt.meta_step()
    return model


# ---------------------------------------------------------------- the spawned ranks


def _train(rank, world, config, split, how):
    model = make_model()
    if how == "opt_first":
        opt = ReptileOptimizer(model.parameters(), **CONFIGS[config])
        ddp = DDP(model)
    else:
        ddp = DDP(model)
        opt = ReptileOptimizer(ddp.parameters(), **CONFIGS[config])
    flags = []  # require_backward_grad_sync after each task (and inside, for the user's no_sync)
    patch = contextlib.nullcontext()
    if how == "control":
        patch = _patched(reptile_fused.ddp, "local_gradients", lambda params: contextlib.nullcontext())
    with patch:
        for meta_batch in rank_tasks(split, rank, world):
            for i, task in enumerate(meta_batch):
                if how == "user_no_sync" and i % 2:  # the user's no_sync() around the whole task
                    with ddp.no_sync():
                        with opt.task():
                            inner_steps(ddp, opt, task)
                        flags.append(ddp.require_backward_grad_sync)  # still the user's False
                    flags.append(ddp.require_backward_grad_sync)
                elif how == "user_no_sync":  # ... around the task body, then one more step outside it
                    with opt.task():
                        with ddp.no_sync():
                            inner_steps(ddp, opt, task[:-1])
                        flags.append(ddp.require_backward_grad_sync)
                        inner_steps(ddp, opt, task[-1:])
                    flags.append(ddp.require_backward_grad_sync)
                else:
                    with opt.task():
                        inner_steps(ddp, opt, task)
                    flags.append(ddp.require_backward_grad_sync)
            opt.meta_step()
    return ddp, opt, model, flags


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _refusals():
    """What a DDP module that cannot skip synchronisation does inside a task, and after it."""
    out = {}
    model = make_model()
    ddp = DDP(model, static_graph=True)
    opt = ReptileOptimizer(ddp.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    task = all_tasks()[0][0]
    try:
        with opt.task():
            inner_steps(ddp, opt, task)
    except RuntimeError as exc:
        out["static_graph"] = str(exc)
    out["static_graph_rolled_back"] = opt.tasks_in_meta_batch == 0 and all(
        torch.equal(a, b) for a, b in zip(before, model.parameters())
    )
    # Outside a task a static-graph DDP model trains as always.
    x, y = task[0]
    F.mse_loss(ddp(x), y).backward()
    out["static_graph_outside_task"] = True
    # Delayed all-reduces run even under no_sync(): refused too.
    delayed = DDP(model, delay_all_reduce_named_params=list(model[3].named_parameters(prefix="3")),
                  param_to_hook_all_reduce=model[0].weight)
    try:
        with opt.task():
            inner_steps(delayed, opt, task)
    except RuntimeError as exc:
        out["delayed"] = str(exc)
    # A DDP module that wraps none of the task's parameters is left alone.
    other = DDP(nn.Linear(3, 2).double())
    with opt.task():
        other(x).sum().backward()
        out["unrelated_keeps_sync"] = other.require_backward_grad_sync
    return out


class TaskInForward(nn.Module):
    """A training step that DDP's forward runs, adapting to one task, as Lightning's manual optimization does."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, task):
        with self.opt.task():
            for x, y in task:
                self.opt.zero_grad()
                loss = F.mse_loss(self.net(x), y)
                if self.ddp.require_backward_grad_sync:  # Lightning's manual_backward under DDP
                    self.ddp.reducer._rebuild_buckets()
                    self.ddp.reducer.prepare_for_backward([])
                loss.backward()
                self.opt.step()
        self.ddp.require_backward_grad_sync = False  # Lightning: keeps DDP's post-forward out
        return torch.zeros(())


def _task_in_forward(rank, world):
    step = TaskInForward()
    ddp = DDP(step)
    step.ddp, step.opt = ddp, ReptileOptimizer(ddp.parameters(), **CONFIGS["sgd"])
    for meta_batch in rank_tasks("even", rank, world):
        for task in meta_batch:
            ddp(task)
            ddp.require_backward_grad_sync = True  # Lightning, after the outer forward
        step.opt.meta_step()
    return step.net


def nested_training(net, first, last, meta_batches, flags=None):
    """Two optimizers (first and last layer) with nested tasks: the inner task ends before
    the outer task's last step.  ``flags`` (a DDP ``net``) records its sync flag as it goes."""
    record = (lambda: flags.append(net.require_backward_grad_sync)) if flags is not None else (lambda: None)
    for meta_batch in meta_batches:
        for task in meta_batch:
            with first.task():
                with last.task():
                    for x, y in task:
                        first.zero_grad()
                        last.zero_grad()
                        F.mse_loss(net(x), y).backward()
                        first.step()
                        last.step()
                record()  # the inner task turned it back on...
                x, y = task[0]
                first.zero_grad()
                F.mse_loss(net(x), y).backward()  # ... and the outer task's next forward off again
                first.step()
                record()
            record()
        first.meta_step()
        last.meta_step()


def _nested(rank, world):
    """Two optimizers with nested tasks over one DDP model."""
    model = make_model()
    ddp = DDP(model)
    first = ReptileOptimizer(model[0].parameters(), **CONFIGS["sgd"])
    last = ReptileOptimizer(model[3].parameters(), **CONFIGS["adam"])
    flags = []
    nested_training(ddp, first, last, rank_tasks("even", rank, world), flags)
    return model, flags


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        results = {}
        for name, (config, split, how) in RUNS.items():
            ddp, opt, model, flags = _train(rank, world, config, split, how)
            results[name] = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "flags": flags}
            if name == "sgd_even":  # then one fine-tuning step outside any task: DDP averages its gradients
                x, y = fine_tune_batch(rank)
                opt.param_groups[0]["lr"] = FINE_TUNE_LR
                opt.zero_grad()
                F.mse_loss(ddp(x), y).backward()
                opt.step()
                results["fine_tune"] = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
        results["task_in_forward"] = {"model": _task_in_forward(rank, world).state_dict()}
        model, flags = _nested(rank, world)
        results["nested"] = {"model": model.state_dict(), "flags": flags}
        results["refusals"] = _refusals()
        results["hook_left"] = reptile_fused.ddp._hook is not None
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- the parent's checks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _max_diff(state, model):
    return max((state[k] - v).abs().max().item() for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", [n for n, (_, _, how) in RUNS.items() if how != "control"])
def test_ddp_model_equals_single_process(ranks, name):
    config = RUNS[name][0]
    expected = single_process(config, all_tasks())
    for r in range(2):
        assert _max_diff(ranks[r][name]["model"], expected) < 1e-10, f"rank {r}"


def test_without_the_switch_ddp_mixes_the_tasks(ranks):
    # The control: the same loop with DDP synchronising inside tasks is a different algorithm.
    expected = single_process("sgd", all_tasks())
    assert _max_diff(ranks[0]["sgd_control"]["model"], expected) > 1e-6
    assert all(ranks[0]["sgd_control"]["flags"])


def test_flags_restored_after_each_task(ranks):
    for r in range(2):
        assert all(ranks[r]["sgd_even"]["flags"])
        # The user's no_sync() around a task body has ended before the task does: True, then True
        # after the task; around a whole task: still the user's False after the task, True after no_sync().
        expected = []
        for meta_batch in rank_tasks("uneven", r, 2):
            expected += [flag for i in range(len(meta_batch)) for flag in ([False, True] if i % 2 else [True, True])]
        assert ranks[r]["sgd_user_no_sync"]["flags"] == expected


def test_outside_a_task_ddp_averages_gradients(ranks):
    model = make_model()
    model.load_state_dict(ranks[0]["sgd_even"]["model"])
    grads = []
    for r in range(2):
        model.zero_grad()
        x, y = fine_tune_batch(r)
        F.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    with torch.no_grad():
        for p, g0, g1 in zip(model.parameters(), *grads):
            p -= FINE_TUNE_LR * (g0 + g1) / 2
    for r in range(2):
        assert _max_diff(ranks[r]["fine_tune"]["model"], model) < 1e-10


def test_task_inside_ddp_forward(ranks):
    # Lightning's manual optimization runs the whole training step, task included, inside DDP's forward.
    expected = single_process("sgd", all_tasks())
    for r in range(2):
        assert _max_diff(ranks[r]["task_in_forward"]["model"], expected) < 1e-10


def test_nested_optimizers(ranks):
    model = make_model()
    first = ReptileOptimizer(model[0].parameters(), **CONFIGS["sgd"], process_group=False)
    last = ReptileOptimizer(model[3].parameters(), **CONFIGS["adam"], process_group=False)
    nested_training(model, first, last, all_tasks())
    for r in range(2):
        assert _max_diff(ranks[r]["nested"]["model"], model) < 1e-10
        assert ranks[r]["nested"]["flags"] == [True, False, True] * 6


def test_static_graph_refused_and_rolled_back(ranks):
    for r in range(2):
        refusals = ranks[r]["refusals"]
        assert "static_graph=True" in refusals["static_graph"] and "ddp.module" in refusals["static_graph"]
        assert "delay_all_reduce_named_params" in refusals["delayed"]
        assert refusals["static_graph_rolled_back"]
        assert refusals["static_graph_outside_task"]
        assert refusals["unrelated_keeps_sync"]
        assert not ranks[r]["hook_left"]


def test_no_process_group_no_hook():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    with opt.task():
        assert reptile_fused.ddp._hook is None
        assert not reptile_fused.ddp._open

