"""adam_step_: the reference against torch.optim.Adam, and every backend against the
reference (every dtype, awkward sizes and alignments, every option, scalars as numbers
or tensors, property-based cases, NaN, bad input)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import strategies as st

from ops.cases import (
    DTYPES, OPTION_SIZES, backend_module, bad_input_test, bufs, cat, config_id, dtype_id, flat_problem, large_test,
    property_cases, refused, run_adam, scalars_test, sizes, targets, unaligned_test, z,
)
from numerics import assert_contract
from reptile_fused import reference as ref

# --------------------------------------------------------------------- the reference vs torch.optim

TORCH_OPTIONS = [
    dict(betas=b, weight_decay=wd, amsgrad=a, maximize=mx)
    for b, wd, a, mx in itertools.product([(0.9, 0.999), (0.0, 0.999)], [0.0, 0.01], [False, True], [False, True])
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=str)
def test_reference_matches_torch_adam(dtype, opts):
    params, grads = flat_problem(dtype, seed=1)
    theirs = [p.clone().requires_grad_() for p in params]
    torch_opt = torch.optim.Adam(theirs, lr=0.01, eps=1e-6, foreach=False, **opts)
    flat = cat(params)
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    vmax = torch.zeros_like(flat) if opts["amsgrad"] else None
    beta1, beta2 = opts["betas"]
    for k, gs in enumerate(grads):
        for p, g in zip(theirs, gs):
            p.grad = g.clone()
        torch_opt.step()
        ref.adam_step_(
            flat, cat(gs), m, v, vmax, k + 1, 0.01, beta1=beta1, beta2=beta2, eps=1e-6,
            weight_decay=opts["weight_decay"], amsgrad=opts["amsgrad"], maximize=opts["maximize"],
        )
    assert torch.equal(flat, cat([p.detach() for p in theirs]))
    assert torch.equal(v, cat([torch_opt.state[p]["exp_avg_sq"] for p in theirs]))


# --------------------------------------------------------------------- every backend vs the reference

# Every flag, alone and together; the first also runs at every size.
CONFIGS = [
    dict(amsgrad=True, weight_decay=0.01),
    dict(),
    dict(step=1),
    dict(step=1, beta1=0.0),  # the authors' Reptile setting: betas=(0, 0.999)
    dict(step=7, weight_decay=0.1, maximize=True),
    dict(maximize=True),
    dict(step=2, amsgrad=True),
    dict(step=50, amsgrad=True, weight_decay=0.01, beta1=0.6, beta2=0.9, eps=1e-6),
    dict(step=4, beta1=0.3),  # 1 - beta1 >= 0.5: the other branch of torch's lerp
    dict(beta1=0.3, beta2=0.9, eps=1e-6),
]
# (step, how step is given, how lr is given)
SCALARS = [(1, "python", "python"), (7, "dev-f32", "dev-f32"), (1, "dev-f32", "python"), (1000, "dev-f64", "dev-f32")]


def test_configs_cover_every_flag():
    keys = set(itertools.chain.from_iterable(CONFIGS))
    assert {"amsgrad", "weight_decay", "maximize", "beta1", "beta2", "eps", "step"} <= keys


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_sizes(device, backend, size, dtype):
    run_adam(backend, device, size, dtype)
    run_adam(backend, device, size, dtype, **CONFIGS[0])


test_unaligned = unaligned_test("adam_step_", also=[(1025, dict(offset=5, step=2, **CONFIGS[0]))])
test_large = large_test("adam_step_")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_options(device, backend, config, dtype):
    for size, offset in sizes(backend, OPTION_SIZES):
        run_adam(backend, device, size, dtype, offset=offset, **config)
    for step, step_kind, lr_kind in SCALARS:
        run_adam(backend, device, 17, dtype, **{**config, "step": step}, step_kind=step_kind, lr_kind=lr_kind)


test_scalars_as_tensors = scalars_test("adam_step_", ("step_kind", "lr_kind"), step=6.0, lr=0.125, amsgrad=True)


@property_cases(
    step=st.integers(1, 10_000),
    lr=st.floats(1e-5, 0.1),
    beta1=st.sampled_from([0.0, 0.5, 0.9]),
    beta2=st.sampled_from([0.9, 0.99, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.01]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)
def test_property(backend, size, offset, dtype, step, lr, beta1, beta2, weight_decay, amsgrad, maximize, seed):
    run_adam(backend, "cpu", size, dtype, offset=offset, seed=seed, step=step, lr=lr, beta1=beta1, beta2=beta2,
             weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


@pytest.mark.parametrize(("device", "backend"), targets())
def test_nan_propagates_like_reference(device, backend):
    param = torch.tensor([1.0, float("nan"), 2.0], device=device)
    grad = torch.tensor([float("nan"), 1.0, 1.0], device=device)
    ea, eas, vmax = torch.zeros(3, device=device), torch.ones(3, device=device), torch.zeros(3, device=device)
    want = [t.clone() for t in (param, grad, ea, eas, vmax)]
    got = [t.clone() for t in (param, grad, ea, eas, vmax)]
    ref.adam_step_(*want, 1, 0.1, amsgrad=True)
    backend_module(backend, device).adam_step_(*got, 1, 0.1, amsgrad=True)
    for g, w, name in zip(got, want, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        assert_contract(g, w, name, backend)


# --------------------------------------------------------------------- bad input


def _step0(ops, device):
    p, g, m, v, _ = bufs(device)
    return (lambda: ops.adam_step_(p, g, m, v, None, 0, 0.1)), [p, m, v]


def _step0_cpu_tensor(ops, device):
    p, g, m, v, _ = bufs(device)
    return (lambda: ops.adam_step_(p, g, m, v, None, torch.tensor(0.0), 0.1)), [p, m, v]


def _amsgrad_no_max(ops, device):
    p, g, m, v, _ = bufs(device)
    return (lambda: ops.adam_step_(p, g, m, v, None, 1, 0.1, amsgrad=True)), [p, m, v]


def _max_shape(ops, device):
    p, g, m, v, vmax = bufs(device)
    return (lambda: ops.adam_step_(p, g, m, v, vmax[:3], 1, 0.1, amsgrad=True)), [p, m, v, vmax]


BAD = {
    "amsgrad no max": refused(lambda m, d: lambda: m.adam_step_(z(device=d), z(device=d), z(device=d), z(device=d), None, 1, 0.1, amsgrad=True)),
    "step 0": refused(lambda m, d: lambda: m.adam_step_(z(device=d), z(device=d), z(device=d), z(device=d), None, 0, 0.1)),
    "step tensor 0": refused(lambda m, d: lambda: m.adam_step_(z(device=d), z(device=d), z(device=d), z(device=d), None, torch.tensor(0.0), 0.1)),
    "exp_avg dtype": refused(lambda m, d: lambda: m.adam_step_(z(device=d), z(device=d), z(dtype=torch.float16, device=d), z(device=d), None, 1, 0.1)),
    "step 0, watched": _step0,
    "step 0 cpu tensor, watched": _step0_cpu_tensor,
    "amsgrad no max, watched": _amsgrad_no_max,
    "max shape": _max_shape,
}  # fmt: skip

test_bad_input_rejected_like_reference = bad_input_test(BAD)


# --------------------------------------------------------------------- first-order MAML: the step's own update
# The step also writes update = param after - param before (opmath) in the same pass.


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_update_sizes(device, backend, size, dtype):
    run_adam(backend, device, size, dtype, update=True)
    run_adam(backend, device, size, dtype, update=True, **CONFIGS[0])


test_update_unaligned = unaligned_test("adam_step_", offsets=(1, 3, {"param": 1, "exp_avg": 2, "update": 3}),
                                       update=True)
test_update_large = large_test("adam_step_", update=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_update_options(device, backend, dtype):
    for config in CONFIGS:
        for size, offset in sizes(backend, OPTION_SIZES):
            run_adam(backend, device, size, dtype, offset=offset, update=True, **config)
    for step, step_kind, lr_kind in SCALARS:
        run_adam(backend, device, 17, dtype, step=step, step_kind=step_kind, lr_kind=lr_kind, update=True)


@property_cases(
    step=st.integers(1, 10_000),
    beta1=st.sampled_from([0.0, 0.9]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)
def test_update_property(backend, size, offset, dtype, step, beta1, amsgrad, maximize, seed):
    run_adam(backend, "cpu", size, dtype, offset=offset, seed=seed, step=step, beta1=beta1, amsgrad=amsgrad,
             maximize=maximize, update=True)


def _update_size(ops, device):
    p, g, m, v, _ = bufs(device)
    return (lambda: ops.adam_step_(p, g, m, v, None, 1, 0.1, update=z(7, device=device))), [p, m, v]


def _update_dtype(ops, device):
    p, g, m, v, _ = bufs(device, torch.float16)
    u = torch.zeros(8, dtype=torch.float16, device=device)  # float16 params take a float32 update
    return (lambda: ops.adam_step_(p, g, m, v, None, 1, 0.1, update=u)), [p, m, v, u]


def _update_is_param(ops, device):
    p, g, m, v, _ = bufs(device)
    return (lambda: ops.adam_step_(p, g, m, v, None, 1, 0.1, update=p)), [p, m, v]


BAD_UPDATE = {
    "update bfloat16 for bfloat16": refused(lambda m, d: lambda: m.adam_step_(*(z(dtype=torch.bfloat16, device=d) for _ in range(4)), None, 1, 0.1, update=z(dtype=torch.bfloat16, device=d))),
    "update float32 for float64": refused(lambda m, d: lambda: m.adam_step_(*(z(dtype=torch.float64, device=d) for _ in range(4)), None, 1, 0.1, update=z(device=d))),
    "update size": refused(lambda m, d: lambda: m.adam_step_(*(z(device=d) for _ in range(4)), None, 1, 0.1, update=z(9, device=d))),
    "update non-contiguous": refused(lambda m, d: lambda: m.adam_step_(*(z(device=d) for _ in range(4)), None, 1, 0.1, update=torch.zeros(16, device=d)[::2])),
    "update on another device": refused(lambda m, d: lambda: m.adam_step_(*(z(device=d) for _ in range(4)), None, 1, 0.1, update=z(device="meta"))),
    "update size, watched": _update_size,
    "update dtype, watched": _update_dtype,
    "update is param, watched": _update_is_param,
}  # fmt: skip

test_update_bad_input_rejected_like_reference = bad_input_test(BAD_UPDATE)
