"""ReptileOptimizer on every backend follows the reference backend's trajectory (the
backend a parameter, as in PyTorch's test_optim.py); the backends share one state
layout; "auto" picks the fastest backend.

Triton runs under its interpreter on CPU tensors (tests/conftest.py), so it gets fewer
meta-iterations; the ``cuda`` cases are gpu-marked."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from numerics import TRAJECTORY, assert_trajectory_close, dtype_id
from ops.cases import FUSED, targets
from reptile_fused.optimizer import ReptileOptimizer

CONFIGS = {
    "sgd": dict(inner_optimizer="sgd", lr=0.05),
    "sgd-nesterov-wd": dict(inner_optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-nesterov-wd-meta": dict(
        inner_optimizer="sgd", lr=0.05, meta_lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "sgd-dampening": dict(inner_optimizer="sgd", lr=0.05, momentum=0.5, dampening=0.3, meta_lr=0.5),
    "adam-reptile": dict(inner_optimizer="adam", lr=1e-2, betas=(0.0, 0.999), meta_lr=0.7),
    "adam-reptile-amsgrad": dict(inner_optimizer="adam", lr=1e-2, meta_lr=0.7, betas=(0.0, 0.999), amsgrad=True),
    "adam-amsgrad": dict(inner_optimizer="adam", lr=1e-2, betas=(0.9, 0.99), amsgrad=True, weight_decay=0.01),
}
# The configurations also run with 16-bit weights.
CONFIGS_16BIT = ["sgd-nesterov-wd", "sgd-nesterov-wd-meta", "adam-reptile", "adam-reptile-amsgrad"]
META_ITERS = {"default": 4, "triton": 2}


def _model(dtype, device):
    torch.manual_seed(0)
    # Many small tensors of odd sizes, so flat-buffer segments start unaligned.
    return nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 1)).to(
        device=device, dtype=dtype
    )


def _trajectory(backend, config, dtype, device, meta_iters=4, tasks=3, inner_steps=3):
    model = _model(dtype, device)
    opt = ReptileOptimizer(model.parameters(), backend=backend, **config)
    assert opt.backends == [backend]
    gen = torch.Generator().manual_seed(1)
    snapshots = []
    for _ in range(meta_iters):
        for _ in range(tasks):
            amp, phase = 1 + 4 * torch.rand(2, generator=gen)
            x = (torch.rand(10, 1, generator=gen) * 10 - 5).to(device=device, dtype=dtype)
            y = amp * torch.sin(x + phase)
            with opt.task():
                for _ in range(inner_steps):
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
        opt.meta_step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots, opt


def _assert_follows_reference(backend, name, dtype, device):
    meta_iters = META_ITERS.get(backend, META_ITERS["default"])
    want, _ = _trajectory("reference", CONFIGS[name], dtype, device, meta_iters=meta_iters)
    got, _ = _trajectory(backend, CONFIGS[name], dtype, device, meta_iters=meta_iters)
    for it, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            assert_trajectory_close(a, b, f"{backend}/{name}: meta-iteration {it}, param {i}")
    # The run must have moved the weights, or the comparison proves nothing.
    start = list(_model(dtype, device).parameters())
    assert any(not torch.equal(w, p.detach()) for w, p in zip(want[-1], start))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("device", "backend"), targets())
def test_trajectory_matches_reference(device, backend, name, dtype):
    _assert_follows_reference(backend, name, dtype, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", CONFIGS_16BIT)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_trajectory_16bit(device, backend, name, dtype):
    """16-bit weights: every op is within one ulp of the reference (tests/ops/), but
    the gradients then see those weights, so a trajectory may drift by a few ulp
    (numerics.TRAJECTORY)."""
    assert dtype in TRAJECTORY
    _assert_follows_reference(backend, name, dtype, device)


def test_auto_picks_cpp_on_cpu():
    model = _model(torch.float32, "cpu")
    opt = ReptileOptimizer(model.parameters(), backend="auto")
    assert opt.backends == ["cpp"]


@pytest.mark.parametrize(("device", "backend"), targets(only=FUSED))
def test_state_dict_round_trips_between_backends(device, backend):
    """Optimizer state produced by a fused backend loads into a reference optimizer and
    both continue identically: the backends share one state layout."""
    _, opt_fused = _trajectory(backend, CONFIGS["adam-amsgrad"], torch.float32, device, meta_iters=2)
    model = _model(torch.float32, device)
    with torch.no_grad():
        for p, q in zip(model.parameters(), opt_fused.param_groups[0]["params"]):
            p.copy_(q)
    opt_ref = ReptileOptimizer(model.parameters(), backend="reference", **CONFIGS["adam-amsgrad"])
    opt_ref.load_state_dict(copy.deepcopy(opt_fused.state_dict()))
    x = torch.linspace(-3, 3, 10, device=device).unsqueeze(1)
    for opt in (opt_fused, opt_ref):
        params = opt.param_groups[0]["params"]

        def net(v, ps=params):
            return torch.tanh(torch.tanh(v @ ps[0].T + ps[1]) @ ps[2].T + ps[3]) @ ps[4].T + ps[5]

        with opt.task():
            opt.zero_grad()
            nn.functional.mse_loss(net(x), torch.sin(x)).backward()
            opt.step()
        opt.meta_step()
    for a, b in zip(opt_fused.param_groups[0]["params"], opt_ref.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
