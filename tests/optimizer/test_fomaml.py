"""First-order MAML (``algorithm="fomaml"``) against an independent oracle.

The oracle is plain Python over the model's parameters, one tensor at a time: autograd
for the gradients, SGD and Adam written out from their textbook formulas, the meta step
θ ← θ + ε · mean over tasks of (θ̃ᵢ − θᵢ,ₖ₋₁).  No library code.  Every CPU backend runs
sequentially (``ReptileOptimizer``) and batched (``BatchedReptile``), with one task
and with several; with one inner step per task, Reptile and FOMAML are the same update.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ops.cases import targets
from reptile_fused import BatchedReptile, ReptileOptimizer

INNER = {
    "sgd": dict(inner_optimizer="sgd", lr=0.1),
    "sgd-momentum": dict(inner_optimizer="sgd", lr=0.05, momentum=0.9),
    "adam": dict(inner_optimizer="adam", lr=0.01, betas=(0.5, 0.99), eps=1e-8),
}
META_LR = 0.7
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def _tasks(meta_iters, n, k, dtype, seed=1):
    """``[iteration][task][step] -> (x, y)``; every task and step its own batch."""
    g = torch.Generator().manual_seed(seed)
    return [
        [[(torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(4, 2, generator=g, dtype=dtype)) for _ in range(k)]
         for _ in range(n)]
        for _ in range(meta_iters)
    ]  # fmt: skip


# ---------------------------------------------------------------------- the oracle


def _oracle_step(inner, name, p, g, state):
    """One inner step of one parameter tensor, written out (no torch.optim, no library)."""
    lr = INNER[inner]["lr"]
    if name == "sgd":
        momentum = INNER[inner].get("momentum", 0.0)
        if momentum:
            state["buf"] = g.clone() if "buf" not in state else momentum * state["buf"] + g
            g = state["buf"]
        return p - lr * g
    beta1, beta2 = INNER[inner]["betas"]
    eps = INNER[inner]["eps"]
    t = state["t"] = state.get("t", 0) + 1
    state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * g
    state["v"] = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * g * g
    denom = state["v"].sqrt() / math.sqrt(1 - beta2**t) + eps
    return p - (lr / (1 - beta1**t)) * state["m"] / denom


def _oracle(model, inner, tasks, algorithm, carry_state):
    """θ after the meta-iterations; ``carry_state``: the inner state runs on from task to task."""
    name = INNER[inner]["inner_optimizer"]
    theta = [p.detach().clone() for p in model.parameters()]
    states = [{} for _ in theta]
    for meta_batch in tasks:
        directions = []
        for task in meta_batch:
            if not carry_state:
                states = [{} for _ in theta]
            weights = [t.clone() for t in theta]
            before_last = weights
            for x, y in task:
                leaves = [w.clone().requires_grad_() for w in weights]
                out = torch.func.functional_call(model, dict(zip((n for n, _ in model.named_parameters()), leaves)), (x,))
                grads = torch.autograd.grad(F.mse_loss(out, y), leaves)
                before_last = weights
                weights = [_oracle_step(inner, name, w, g, s) for w, g, s in zip(weights, grads, states)]
            start = before_last if algorithm == "fomaml" else theta
            directions.append([w - s for w, s in zip(weights, start)])
        theta = [t + META_LR * sum(d[i] for d in directions) / len(directions) for i, t in enumerate(theta)]
    return theta


# ---------------------------------------------------------------------- the library


def _sequential(model, inner, tasks, backend, algorithm, reset):
    opt = ReptileOptimizer(model.parameters(), meta_lr=META_LR, backend=backend, algorithm=algorithm,
                           reset_inner_state=reset, **INNER[inner])  # fmt: skip
    for meta_batch in tasks:
        for task in meta_batch:
            with opt.task():
                for x, y in task:
                    opt.zero_grad()
                    F.mse_loss(model(x), y).backward()
                    opt.step()
        opt.meta_step()
    return [p.detach() for p in model.parameters()]


def _batched(model, inner, tasks, backend, algorithm):
    hyper = {k: v for k, v in INNER[inner].items() if k != "inner_optimizer"}
    br = BatchedReptile(model, len(tasks[0]), INNER[inner]["inner_optimizer"], meta_lr=META_LR, backend=backend,
                        algorithm=algorithm, loss_fn=F.mse_loss, **hyper)  # fmt: skip
    for meta_batch in tasks:
        for step in range(len(meta_batch[0])):
            br.inner_step(torch.stack([t[step][0] for t in meta_batch]), torch.stack([t[step][1] for t in meta_batch]))
        br.meta_step()
    return [p.detach() for p in model.parameters()]


def _assert_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCE[dtype])


def _check_moved(model_before, theta):
    """The comparison means something only if the meta steps changed θ."""
    assert any(not torch.equal(p, t) for p, t in zip(model_before.parameters(), theta))


CPU = targets(cuda=False)
GPU_AND_CPU = targets()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("reset", ["task", "never"])
@pytest.mark.parametrize(("device", "backend"), GPU_AND_CPU)
def test_sequential_matches_oracle(device, backend, reset, n, inner, dtype):
    tasks = _tasks(2 if backend == "triton" else 3, n, 3, dtype)
    model = _model(dtype)
    expected = _oracle(model, inner, tasks, "fomaml", carry_state=reset == "never")
    _check_moved(model, expected)
    actual = _sequential(_to(model, device), inner, _tasks_to(tasks, device), backend, "fomaml", reset)
    _assert_close([a.cpu() for a in actual], expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(("device", "backend"), GPU_AND_CPU)
def test_batched_matches_oracle(device, backend, n, inner, dtype):
    tasks = _tasks(2 if backend == "triton" else 3, n, 3, dtype)
    model = _model(dtype)
    expected = _oracle(model, inner, tasks, "fomaml", carry_state=False)
    _check_moved(model, expected)
    actual = _batched(_to(model, device), inner, _tasks_to(tasks, device), backend, "fomaml")
    _assert_close([a.cpu() for a in actual], expected, dtype)


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize(("device", "backend"), CPU)
def test_oracle_tells_reptile_from_fomaml(device, backend, inner):
    """With several inner steps the two algorithms differ, and the library's Reptile
    still matches the oracle's: the oracle is not blind to the choice."""
    tasks = _tasks(2, 2, 3, torch.float64)
    model = _model(torch.float64)
    fomaml = _oracle(model, inner, tasks, "fomaml", carry_state=False)
    reptile = _oracle(model, inner, tasks, "reptile", carry_state=False)
    assert not all(torch.allclose(a, b) for a, b in zip(fomaml, reptile))
    actual = _sequential(copy.deepcopy(model), inner, tasks, backend, "reptile", "task")
    _assert_close(actual, reptile, torch.float64)


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize(("device", "backend"), CPU)
def test_one_inner_step_makes_reptile_and_fomaml_equal(device, backend, mode, inner):
    tasks = _tasks(3, 3, 1, torch.float64)
    results = {}
    for algorithm in ("reptile", "fomaml"):
        model = _model(torch.float64)
        if mode == "sequential":
            results[algorithm] = _sequential(model, inner, tasks, backend, algorithm, "task")
        else:
            results[algorithm] = _batched(model, inner, tasks, backend, algorithm)
    _assert_close(results["fomaml"], results["reptile"], torch.float64)


@pytest.mark.parametrize(("device", "backend"), CPU)
def test_parameter_without_gradient_at_the_last_step_contributes_nothing(device, backend):
    """A parameter that stepped earlier in the task but had no gradient at its last
    step (``zero_grad(set_to_none=True)``) moved 0 at that step: FOMAML adds nothing for it."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).double()
    first, second = model[0].weight, model[1].weight
    before = [p.detach().clone() for p in model.parameters()]
    opt = ReptileOptimizer(model.parameters(), lr=0.1, backend=backend, algorithm="fomaml")
    x = torch.randn(3, 2, dtype=torch.float64)
    with opt.task():
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()  # every parameter steps
        opt.zero_grad(set_to_none=True)
        (model[0](x).sum()).backward()
        for p in model[1].parameters():
            p.grad = None
        opt.step()  # only the first layer steps
    opt.meta_step()
    assert not torch.equal(first, before[0])
    torch.testing.assert_close(second.detach(), before[2], rtol=0, atol=0)


@pytest.mark.parametrize(("device", "backend"), CPU)
def test_task_without_a_step_contributes_nothing(device, backend):
    model = _model(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ReptileOptimizer(model.parameters(), lr=0.1, backend=backend, algorithm="fomaml")
    tasks = _tasks(1, 1, 2, torch.float64)
    with opt.task():  # a real task first, so the update buffer holds something stale
        for x, y in tasks[0][0]:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    opt.meta_step()
    after_one = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after_one, before))
    with opt.task():
        pass
    opt.meta_step()
    for p, a in zip(model.parameters(), after_one):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=1e-15)


def test_algorithm_is_checked_and_shown():
    model = _model(torch.float64)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ReptileOptimizer(model.parameters(), algorithm="maml")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        BatchedReptile(model, 2, algorithm="foml")
    opt = ReptileOptimizer(model.parameters(), algorithm="fomaml", backend="reference")
    assert "algorithm='fomaml'" in repr(opt)
    assert opt.state_dict()["reptile"]["algorithm"] == "fomaml"
    assert copy.deepcopy(opt).algorithm == "fomaml"


def test_mid_meta_batch_state_dict_refuses_the_other_algorithm():
    model = _model(torch.float64)
    opt = ReptileOptimizer(model.parameters(), lr=0.1, backend="reference", algorithm="fomaml")
    (x, y), = _tasks(1, 1, 1, torch.float64)[0][0]
    with opt.task():
        F.mse_loss(model(x), y).backward()
        opt.step()
    saved = opt.state_dict()
    other = ReptileOptimizer(_model(torch.float64).parameters(), lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="algorithm='fomaml'"):
        other.load_state_dict(saved)
    same = ReptileOptimizer(_model(torch.float64).parameters(), lr=0.1, backend="reference", algorithm="fomaml")
    same.load_state_dict(saved)
    assert same.tasks_in_meta_batch == 1


def _to(model, device):
    return model.to(device)


def _tasks_to(tasks, device):
    return [[[(x.to(device), y.to(device)) for x, y in task] for task in mb] for mb in tasks]
