"""torch.distributed.checkpoint's standard recipes resume a ReptileOptimizer bit for bit (issue 23, item 3).

The recipes load into a *fresh* optimizer's state dict as the template (``dcp.load`` fills
only the template's keys), so every phase's ``state_dict()`` has the same keys.  Each
case runs the same training three ways: uninterrupted; checkpointed at a phase and
continued (saving must change nothing); and resumed from that checkpoint in a fresh
model and optimizer.  All three must end with the same weights, bit for bit.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from reptile_fused import ReptileOptimizer
from test_distributed import _finish, _init, spawn

# dcp without a process group warns that it runs without one; that is the single-process case here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is:UserWarning")

CONFIGS = {
    # dampening != 0: a momentum buffer that holds nothing yet and one holding zeros step differently.
    "sgd_momentum": dict(inner_optimizer="sgd", lr=0.1, momentum=0.9, dampening=0.25, weight_decay=0.01),
    "sgd_plain": dict(inner_optimizer="sgd", lr=0.1),
    "adam": dict(inner_optimizer="adam", lr=0.05, betas=(0.5, 0.9), weight_decay=0.01),
    "adam_amsgrad": dict(inner_optimizer="adam", lr=0.05, betas=(0.5, 0.9), amsgrad=True),
}
# Three meta-batches of two tasks; checkpoints at the points where the state differs most.
PHASES = {"fresh": 0, "after_meta_step": 2, "mid_meta_batch": 3}
TASKS = 6


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def task_data(t: int):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)


def train(model, opt, start: int, stop: int) -> None:
    """Tasks ``start`` to ``stop - 1``, a meta step after every second.  The last layer gets
    no gradient in the first meta-batch, nor at the first step of each later task, so
    checkpoints mix parameters with inner state and parameters without."""
    for t in range(start, stop):
        x, y = task_data(t)
        with opt.task():
            for k in range(2):
                opt.zero_grad(set_to_none=True)
                skip_last = t < 2 or k == 0
                out = model[1](model[0](x)).sum(-1, keepdim=True).expand(-1, 2) if skip_last else model(x)
                F.mse_loss(out, y).backward()
                opt.step()
        if t % 2 == 1:
            opt.meta_step()
    # Gradients released: torch.distributed.checkpoint would run its zero-lr initialising
    # step() here if the optimizer's state looked empty.
    opt.zero_grad(set_to_none=True)


def new_run(config: dict, algorithm: str, reset: str, seed: int = 0):
    model = make_model(seed)
    return model, ReptileOptimizer(model.parameters(), **config, algorithm=algorithm, reset_inner_state=reset)


class AppState(Stateful):
    """The DCP tutorial's pattern: one Stateful that saves and restores model and optimizer."""

    def __init__(self, model, opt, optimizer_only: bool = False):
        self.model, self.opt, self.optimizer_only = model, opt, optimizer_only

    def state_dict(self):
        if self.optimizer_only:
            return {"model": self.model.state_dict(), "optim": get_optimizer_state_dict(self.model, self.opt)}
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict):
        if self.optimizer_only:
            self.model.load_state_dict(state_dict["model"])
            set_optimizer_state_dict(self.model, self.opt, state_dict["optim"])
        else:
            set_state_dict(self.model, self.opt, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])


def save(recipe: str, model, opt, where) -> None:
    if recipe == "template":
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=where)
    else:
        dcp.save({"app": AppState(model, opt, optimizer_only=recipe == "optimizer_only")}, checkpoint_id=where)


def load(recipe: str, model, opt, where) -> None:
    """Into a fresh model and optimizer: their own state dicts are the templates."""
    if recipe == "template":
        template = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(template, checkpoint_id=where)
        model.load_state_dict(template["model"])
        opt.load_state_dict(template["optim"])
    else:
        dcp.load({"app": AppState(model, opt, optimizer_only=recipe == "optimizer_only")}, checkpoint_id=where)


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


CASES = [
    (config, algorithm, reset)
    for config in CONFIGS
    for algorithm, reset in [("reptile", "never"), ("reptile", "task"), ("fomaml", "never")]
    if config != "sgd_plain" or reset == "never"  # no inner state: the reset changes nothing
]


@pytest.mark.parametrize("config,algorithm,reset", CASES)
def test_dcp_recipes_resume_bit_exactly(tmp_path, config, algorithm, reset):
    expected_model, expected_opt = new_run(CONFIGS[config], algorithm, reset)
    train(expected_model, expected_opt, 0, TASKS)
    expected = weights(expected_model)
    for phase, at in PHASES.items():
        for recipe in ("template", "app_state", "optimizer_only"):
            where = tmp_path / f"{phase}_{recipe}"
            model, opt = new_run(CONFIGS[config], algorithm, reset)
            train(model, opt, 0, at)
            save(recipe, model, opt, where)
            assert opt.tasks_in_meta_batch == at % 2
            train(model, opt, at, TASKS)
            resumed_model, resumed_opt = new_run(CONFIGS[config], algorithm, reset, seed=1)
            load(recipe, resumed_model, resumed_opt, where)
            assert resumed_opt.tasks_in_meta_batch == at % 2
            train(resumed_model, resumed_opt, at, TASKS)
            for a, b, c in zip(expected, model.parameters(), resumed_model.parameters()):
                assert torch.equal(a, b), (phase, recipe, "saving changed the run")
                assert torch.equal(a, c), (phase, recipe, "the resumed run differs")


def test_state_dict_keys_are_the_same_in_every_phase():
    """The template of a fresh optimizer has every key a later checkpoint has (and no more)."""
    for config in CONFIGS.values():
        model, opt = new_run(config, "reptile", "never")

        def keys():
            sd = opt.state_dict()
            return {i: sorted(e) for i, e in sd["state"].items()}, [sorted(g) for g in sd["param_groups"]]

        fresh = keys()
        assert len(fresh[0]) == 4  # every trainable parameter
        train(model, opt, 0, 3)
        assert keys() == fresh  # mid-meta-batch
        train(model, opt, 3, 4)
        assert keys() == fresh  # after meta_step()


@pytest.mark.parametrize("config", ["sgd_momentum", "adam"])
def test_a_fresh_state_dict_is_zero_filled_and_loads_as_empty(config):
    model, opt = new_run(CONFIGS[config], "reptile", "never")
    sd = opt.state_dict()
    for entry in sd["state"].values():
        assert all(not v.any() for k, v in entry.items() if k != "momentum_buffer_empty")
        assert entry.get("momentum_buffer_empty", torch.tensor(True)).item() is True
    assert all(g["tasks_in_meta_batch"] == 0 and g["inner_state_entries"] == 0 for g in sd["param_groups"])
    # Loading it allocates no meta-batch buffers (the anchor and task sum are the format's zeros).
    opt.load_state_dict(sd)
    assert all(f.anchor is None for f in opt._flats)


def test_the_zero_lr_initialising_step_of_dcp_never_runs():
    """get_state_dict steps an optimizer whose ``state`` is empty and whose gradients are
    all None; a ReptileOptimizer's state has an entry per parameter from construction on."""
    model, opt = new_run(CONFIGS["adam"], "reptile", "never")
    assert len(opt.state) == 4 and all(e["step"].item() == 0 for e in opt.state.values())
    opt.zero_grad(set_to_none=True)
    get_state_dict(model, opt)
    assert all(e["step"].item() == 0 for e in opt.state.values())
    # SGD without momentum keeps no inner state at all: it still has entries, so no step
    # runs, and a meta-batch left open is no reason to raise.
    model, opt = new_run(CONFIGS["sgd_plain"], "reptile", "never")
    train(model, opt, 0, 1)
    assert opt.state[next(model.parameters())] == {"momentum_buffer": None}
    get_state_dict(model, opt)
    assert opt.tasks_in_meta_batch == 1


def test_a_template_with_other_hyperparameters_is_refused(tmp_path):
    """A template that lacks the checkpoint's inner-state keys brings the hyperparameters
    (groups) but not the state; the counts in the groups name what is missing."""
    model, opt = new_run(CONFIGS["sgd_momentum"], "reptile", "never")
    train(model, opt, 0, 2)
    save("template", model, opt, tmp_path / "sgd")
    other, other_opt = new_run(CONFIGS["sgd_plain"], "reptile", "never", seed=1)
    with pytest.raises(ValueError, match="had inner-optimizer state .* only 0 came with it"):
        load("template", other, other_opt, tmp_path / "sgd")

    model, opt = new_run(CONFIGS["adam_amsgrad"], "reptile", "never")
    train(model, opt, 0, 2)
    save("template", model, opt, tmp_path / "amsgrad")
    other, other_opt = new_run(CONFIGS["adam"], "reptile", "never", seed=1)
    before = other_opt.state_dict()
    with pytest.raises(ValueError, match="no max_exp_avg_sq, which its param group's hyperparameters use"):
        load("template", other, other_opt, tmp_path / "amsgrad")
    assert other_opt.param_groups[0].get("amsgrad") is False  # refused whole
    assert other_opt.state_dict()["param_groups"] == before["param_groups"]


def test_flattened_optimizer_state_dicts_are_refused(tmp_path):
    """flatten_optimizer_state_dict=True rebuilds the groups from the live optimizer's keys,
    dropping the meta-batch count: refused, never read as a closed meta-batch."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model, opt = new_run(CONFIGS["adam"], "reptile", "never")
    train(model, opt, 0, 3)
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=tmp_path)
    other, other_opt = new_run(CONFIGS["adam"], "reptile", "never", seed=1)
    template = {"optim": get_optimizer_state_dict(other, other_opt, options=options)}
    dcp.load(template, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match="no count of the tasks in its meta-batch"):
        set_optimizer_state_dict(other, other_opt, template["optim"], options=options)


def test_malformed_entries_are_refused_whole():
    for config, key, value, match in [
        ("sgd_momentum", "momentum_buffer_empty", 1, "must be True or False"),
        ("sgd_momentum", "exp_avg", torch.zeros(5, 3, dtype=torch.float64), "not state of inner_optimizer='sgd'"),
        ("adam", "step", torch.tensor(-1), "not a step count"),
        ("adam", "step", 2.5, "not a step count"),
    ]:
        model, opt = new_run(CONFIGS[config], "reptile", "never")
        train(model, opt, 0, 1)
        before = opt.state_dict()
        bad = opt.state_dict()
        bad["state"][0][key] = value
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert opt.tasks_in_meta_batch == 1
        for entry, again in zip(before["state"].values(), after["state"].values()):
            assert all(torch.equal(entry[k], again[k]) for k in entry)


# ----------------------------------------------------------------- the formats that came before


def _older_format(sd: dict) -> dict:
    """What state_dict() wrote before entries were zero-filled: entries only for parameters
    with inner state (none of the new flags) plus, mid-meta-batch, anchor and task_sum."""
    tasks = sd["reptile"]["tasks_in_meta_batch"]
    state = {}
    for idx, entry in sd["state"].items():
        old = {}
        if int(entry.get("step", 0)) or not bool(entry.get("momentum_buffer_empty", True)):
            old = {k: v for k, v in entry.items() if k not in ("anchor", "task_sum", "momentum_buffer_empty")}
            if "step" in old:
                old["step"] = int(old["step"])  # a Python int then
        if tasks:
            old.update(anchor=entry["anchor"], task_sum=entry["task_sum"])
        if old:
            state[idx] = old
    return {**sd, "state": state}


@pytest.mark.parametrize("config", ["sgd_momentum", "adam_amsgrad"])
def test_the_older_format_still_resumes_exactly(config):
    expected_model, expected_opt = new_run(CONFIGS[config], "reptile", "never")
    train(expected_model, expected_opt, 0, TASKS)
    for at in (1, 3):  # first-task state (the last layer's empty), mid-meta-batch
        model, opt = new_run(CONFIGS[config], "reptile", "never")
        train(model, opt, 0, at)
        old = _older_format(opt.state_dict())
        resumed, resumed_opt = new_run(CONFIGS[config], "reptile", "never", seed=1)
        resumed.load_state_dict(model.state_dict())
        resumed_opt.load_state_dict(old)
        train(resumed, resumed_opt, at, TASKS)
        for a, b in zip(expected_model.parameters(), resumed.parameters()):
            assert torch.equal(a, b), at


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_torch_optimizer_state_dicts_still_load(inner):
    """torch.optim's own state dicts load, and both optimizers then take the same step (CPU: bit for bit)."""
    if inner == "sgd":
        kwargs = dict(lr=0.1, momentum=0.9, dampening=0.25)
        theirs_model, ours_model = make_model(0), make_model(0)
        theirs = torch.optim.SGD(theirs_model.parameters(), **kwargs)
    else:
        kwargs = dict(lr=0.05, betas=(0.5, 0.9))
        theirs_model, ours_model = make_model(0), make_model(0)
        theirs = torch.optim.Adam(theirs_model.parameters(), **kwargs, foreach=False)
    x, y = task_data(0)

    def step(model, opt):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    step(theirs_model, theirs)
    sd = theirs.state_dict()
    if inner == "sgd":  # torch's "no momentum buffer yet" for one parameter: None
        sd["state"][3] = {"momentum_buffer": None}
        theirs.state[list(theirs_model.parameters())[3]]["momentum_buffer"] = None
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = ReptileOptimizer(ours_model.parameters(), inner, **kwargs, backend="reference")
    ours.load_state_dict(sd)
    step(theirs_model, theirs)
    step(ours_model, ours)
    for a, b in zip(theirs_model.parameters(), ours_model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- two processes (gloo)


DIST_CONFIGS = {
    "adam_task": dict(CONFIGS["adam"], reset_inner_state="task"),
    "sgd_meta_step": dict(CONFIGS["sgd_momentum"], reset_inner_state="meta_step"),
}


def _dist_train(model, opt, rank: int, start: int, stop: int) -> None:
    """Meta-batches ``start`` to ``stop - 1``: each rank adapts its own task of each."""
    for m in range(start, stop):
        x, y = task_data(2 * m + rank)
        with opt.task():
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                F.mse_loss(model(x), y).backward()
                opt.step()
        opt.meta_step()
    opt.zero_grad(set_to_none=True)


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    try:
        warnings.simplefilter("ignore", UserWarning)
        for name, config in DIST_CONFIGS.items():
            where = os.path.join(out_dir, name)
            model = make_model(0)  # replicated: plain tensors, the same on every rank
            opt = ReptileOptimizer(model.parameters(), **config)
            _dist_train(model, opt, rank, 0, 2)
            dcp.save({"app": AppState(model, opt)}, checkpoint_id=where)
            _dist_train(model, opt, rank, 2, 4)
            resumed = make_model(1)
            resumed_opt = ReptileOptimizer(resumed.parameters(), **config)
            dcp.load({"app": AppState(resumed, resumed_opt)}, checkpoint_id=where)
            _dist_train(resumed, resumed_opt, rank, 2, 4)
            # Inside a distributed meta-batch the task sums are split over the ranks: refused.
            with resumed_opt.task():
                pass
            try:
                get_state_dict(resumed, resumed_opt)
                refused = ""
            except RuntimeError as exc:
                refused = str(exc)
            resumed_opt.meta_step()
            torch.save(
                {"straight": weights(model), "resumed": weights(resumed), "refused": refused},
                os.path.join(out_dir, f"{name}_{rank}.pt"),
            )
    finally:
        _finish()


def test_two_gloo_processes_save_and_load_through_dcp(tmp_path):
    spawn(_dist_worker, 2, str(tmp_path))
    for name in DIST_CONFIGS:
        results = [torch.load(tmp_path / f"{name}_{rank}.pt", weights_only=True) for rank in range(2)]
        for r in results:
            for a, b in zip(r["straight"], r["resumed"]):
                assert torch.equal(a, b), name
            assert "middle of a distributed meta-batch" in r["refused"]
        for a, b in zip(results[0]["resumed"], results[1]["resumed"]):
            assert torch.equal(a, b), name
