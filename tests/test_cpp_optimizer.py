"""ReptileOptimizer on the cpp backend follows the reference backend's trajectory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reptile_fused.backends import cpp
from reptile_fused.optimizer import ReptileOptimizer

pytestmark = pytest.mark.skipif(
    cpp.unavailable_reason(torch.device("cpu")) is not None, reason=f"extension not built: {cpp._LOAD_ERROR}"
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

CONFIGS = {
    "sgd": dict(inner_optimizer="sgd", lr=0.05),
    "sgd-nesterov-wd": dict(inner_optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening": dict(inner_optimizer="sgd", lr=0.05, momentum=0.5, dampening=0.3, meta_lr=0.5),
    "adam-reptile": dict(inner_optimizer="adam", lr=1e-2, betas=(0.0, 0.999), meta_lr=0.7),
    "adam-amsgrad": dict(inner_optimizer="adam", lr=1e-2, betas=(0.9, 0.99), amsgrad=True, weight_decay=0.01),
}


def _model(dtype, device):
    torch.manual_seed(0)
    # Many small tensors of odd sizes, so flat-buffer segments start unaligned.
    return nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 1)).to(
        device=device, dtype=dtype
    )


def _trajectory(backend, config, dtype, device, meta_iters=4, tasks=3, inner_steps=3):
    model = _model(dtype, device)
    opt = ReptileOptimizer(model.parameters(), backend=backend, **config)
    assert set(opt.backends) == {backend}
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_matches_reference(name, dtype, device):
    want, _ = _trajectory("reference", CONFIGS[name], dtype, device)
    got, _ = _trajectory("cpp", CONFIGS[name], dtype, device)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for it, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"meta-iteration {it}, param {i}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sgd-nesterov-wd", "adam-reptile"])
def test_trajectory_bfloat16(name, device):
    """16-bit weights: every op is within one ulp of the reference (test_cpp_ops), but
    the gradients then see those weights, so a trajectory may drift by a few ulp."""
    want, _ = _trajectory("reference", CONFIGS[name], torch.bfloat16, device, meta_iters=3)
    got, _ = _trajectory("cpp", CONFIGS[name], torch.bfloat16, device, meta_iters=3)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=3e-2, atol=1e-2)


def test_auto_picks_cpp_on_cpu():
    model = _model(torch.float32, "cpu")
    opt = ReptileOptimizer(model.parameters(), backend="auto")
    assert opt.backends == ["cpp"]


def test_state_dict_round_trips_between_backends():
    """Optimizer state produced by the cpp backend loads into a reference optimizer and
    both continue identically: the backends share one state layout."""
    _, opt_cpp = _trajectory("cpp", CONFIGS["adam-amsgrad"], torch.float32, "cpu", meta_iters=2)
    model = _model(torch.float32, "cpu")
    with torch.no_grad():
        for p, q in zip(model.parameters(), opt_cpp.param_groups[0]["params"]):
            p.copy_(q)
    opt_ref = ReptileOptimizer(model.parameters(), backend="reference", **CONFIGS["adam-amsgrad"])
    opt_ref.load_state_dict(copy.deepcopy(opt_cpp.state_dict()))
    x = torch.linspace(-3, 3, 10).unsqueeze(1)
    for opt in (opt_cpp, opt_ref):
        params = opt.param_groups[0]["params"]
        net = lambda v, ps=params: torch.tanh(torch.tanh(v @ ps[0].T + ps[1]) @ ps[2].T + ps[3]) @ ps[4].T + ps[5]
        with opt.task():
            opt.zero_grad()
            nn.functional.mse_loss(net(x), torch.sin(x)).backward()
            opt.step()
        opt.meta_step()
    for a, b in zip(opt_cpp.param_groups[0]["params"], opt_ref.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
