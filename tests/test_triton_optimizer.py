"""ReptileOptimizer(backend="triton") against backend="reference" over two meta-iterations.

Runs under Triton's interpreter on CPU tensors without a GPU (see tests/conftest.py),
on CUDA with one.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from reptile_fused.backends import triton as T  # noqa: E402
from reptile_fused.optimizer import ReptileOptimizer  # noqa: E402
from triton_numerics import assert_ulp_close  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    T.unavailable_reason(DEVICE) is not None, reason=f"triton backend unavailable: {T.unavailable_reason(DEVICE)}"
)

CONFIGS = {
    "sgd-momentum": dict(inner_optimizer="sgd", lr=0.05, meta_lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam-amsgrad": dict(inner_optimizer="adam", lr=1e-2, meta_lr=0.7, betas=(0.0, 0.999), amsgrad=True),
}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DEVICE, dtype)


def _train(model: torch.nn.Module, backend: str, config: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    opt = ReptileOptimizer(model.parameters(), backend=backend, **config)
    assert opt.backends == [backend]
    gen = torch.Generator().manual_seed(1)
    for _meta_iteration in range(2):
        for _task in range(3):
            slope = torch.randn(4, 1, generator=gen)
            with opt.task():
                for _inner in range(3):
                    x = torch.randn(16, 4, generator=gen)
                    y = x @ slope
                    loss = torch.nn.functional.mse_loss(model(x.to(DEVICE, dtype)), y.to(DEVICE, dtype))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        opt.meta_step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_triton_optimizer_matches_reference(config, dtype):
    model = _model(dtype)
    twin = copy.deepcopy(model)
    expected = _train(model, "reference", CONFIGS[config], dtype)
    got = _train(twin, "triton", CONFIGS[config], dtype)
    # Eighteen inner steps and two meta steps: allow the per-op rounding slack to compound a little.
    ulps = 8 if dtype == torch.float32 else 2
    for g, e in zip(got, expected):
        assert_ulp_close(g, e, ulps=ulps, atol=1e-6, what=f"{config}/{dtype}")
    # The run must have moved the weights, or the comparison proves nothing.
    assert any(not torch.equal(e, p.detach()) for e, p in zip(expected, _model(dtype).parameters()))
