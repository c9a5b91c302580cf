"""sgd_step_: the reference against torch.optim.SGD, and every backend against the
reference (every dtype, awkward sizes and alignments, every option, scalars as numbers
or tensors, property-based cases, bad input)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import strategies as st

from ops.cases import (
    DTYPES, FUSED, OPTION_SIZES, SGD_CONFIGS, backend_module, bad_input_test, bufs, cat, config_id, dtype_id,
    flat_problem, large_test, property_cases, refused, run_sgd, scalars_test, sizes, targets, unaligned_test, z,
)
from reptile_fused import reference as ref

# --------------------------------------------------------------------- the reference vs torch.optim

TORCH_OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 0.01], [False, True], [False, True])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=str)
def test_reference_matches_torch_sgd(dtype, opts):
    params, grads = flat_problem(dtype)
    theirs = [p.clone().requires_grad_() for p in params]
    torch_opt = torch.optim.SGD(theirs, lr=0.05, foreach=False, **opts)
    flat = cat(params)
    buf = torch.zeros_like(flat) if opts["momentum"] else None
    for k, gs in enumerate(grads):
        for p, g in zip(theirs, gs):
            p.grad = g.clone()
        torch_opt.step()
        ref.sgd_step_(flat, cat(gs), buf, 0.05, first_step=(k == 0), **opts)
    assert torch.equal(flat, cat([p.detach() for p in theirs]))
    if buf is not None:
        assert torch.equal(buf, cat([torch_opt.state[p]["momentum_buffer"] for p in theirs]))


# --------------------------------------------------------------------- every backend vs the reference


def test_configs_cover_every_flag():
    keys = set(itertools.chain.from_iterable(SGD_CONFIGS))
    assert {"momentum", "dampening", "weight_decay", "nesterov", "maximize", "first_step"} <= keys


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_sizes(device, backend, size, dtype):
    for config in SGD_CONFIGS[:2]:
        run_sgd(backend, device, size, dtype, **config)


test_unaligned = unaligned_test("sgd_step_")
test_large = large_test("sgd_step_")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=config_id)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_options(device, backend, config, dtype):
    for size, offset in sizes(backend, OPTION_SIZES):
        for lr_kind in ("python", "dev-f32"):
            run_sgd(backend, device, size, dtype, offset=offset, lr_kind=lr_kind, **config)


test_scalars_as_tensors = scalars_test("sgd_step_", ("lr_kind",), lr=0.25, momentum=0.9, dampening=0.0,
                                       weight_decay=0.0)


@property_cases(
    lr=st.floats(1e-4, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    dampening=st.floats(0.0, 0.9),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    first_step=st.booleans(),
)
def test_property(backend, size, offset, dtype, lr, momentum, dampening, weight_decay, nesterov, maximize,
                  first_step, seed):
    if nesterov and momentum == 0:
        momentum = 0.9
    run_sgd(backend, "cpu", size, dtype, offset=offset, seed=seed, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)


@pytest.mark.parametrize(("device", "backend"), targets())
def test_tensor_scalar_is_read_at_launch(device, backend):
    """A 0-dim tensor scalar is read each call (what a CUDA graph replay relies on)."""
    ops = backend_module(backend, device)
    lr = torch.tensor(0.5, device=device)
    param = torch.zeros(17, device=device)
    grad = torch.ones(17, device=device)
    ops.sgd_step_(param, grad, None, lr)
    lr.fill_(0.25)
    ops.sgd_step_(param, grad, None, lr)
    assert torch.equal(param, torch.full_like(param, -0.75))


@pytest.mark.parametrize(("device", "backend"), targets())
def test_float64_lr_is_not_rounded_to_float32(device, backend):
    """Triton passes float arguments as float32; float64 buffers must see the float64 value."""
    ops = backend_module(backend, device)
    param = torch.zeros(3, dtype=torch.float64, device=device)
    grad = torch.ones(3, dtype=torch.float64, device=device)
    ops.sgd_step_(param, grad, None, 0.1)
    assert torch.equal(param, torch.full_like(param, -0.1))


@pytest.mark.parametrize(("device", "backend"), targets())
def test_cpu_scalar_tensor_beside_buffers(device, backend):
    """A CPU 0-dim scalar is accepted whatever the buffers' device (read on the host when they are not on the CPU)."""
    ops = backend_module(backend, device)
    p, g = torch.zeros(5, device=device), torch.ones(5, device=device)
    ops.sgd_step_(p, g, None, torch.tensor(0.5))
    assert torch.equal(p, torch.full_like(p, -0.5))


# --------------------------------------------------------------------- bad input


def _shape(ops, device):
    p, g, b, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p, g[:4], b, 0.1, momentum=0.9)), [p, b]


def _no_buffer(ops, device):
    p, g, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p, g, None, 0.1, momentum=0.9)), [p]


def _grad_dtype(ops, device):
    p, g, b, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p, g.double(), b, 0.1, momentum=0.9)), [p, b]


def _2d(ops, device):
    p, g, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p.view(2, 4), g.view(2, 4), None, 0.1)), [p]


def _noncontiguous(ops, device):
    p, g, *_ = bufs(device, n=16)
    return (lambda: ops.sgd_step_(p[::2], g[::2], None, 0.1)), [p]


def _int(ops, device):
    p = torch.zeros(8, dtype=torch.int32, device=device)
    g = torch.ones(8, dtype=torch.int32, device=device)
    return (lambda: ops.sgd_step_(p, g, None, 0.1)), [p]


def _lr_vector(ops, device):
    p, g, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p, g, None, torch.ones(2, device=device))), [p]


BAD = {
    "non-contiguous": refused(lambda m, d: lambda: m.sgd_step_(torch.zeros(16, device=d)[::2], z(device=d), None, 0.1)),
    "2-D param": refused(lambda m, d: lambda: m.sgd_step_(torch.zeros(2, 4, device=d), torch.zeros(2, 4, device=d), None, 0.1)),
    "int dtype": refused(lambda m, d: lambda: m.sgd_step_(z(dtype=torch.int32, device=d), z(dtype=torch.int32, device=d), None, 0.1)),
    "grad size": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(7, device=d), None, 0.1)),
    "grad dtype": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(dtype=torch.float64, device=d), None, 0.1)),
    "no momentum buffer": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, momentum=0.9)),
    "shape, watched": _shape,
    "no buffer, watched": _no_buffer,
    "grad dtype, watched": _grad_dtype,
    "2-D, watched": _2d,
    "non-contiguous, watched": _noncontiguous,
    "int, watched": _int,
    "lr vector": _lr_vector,
}  # fmt: skip
# "lr vector": the reference reads tensor scalars with its own check; fused backends
# use _validate.check_scalar_tensor, which words the same rejection differently.


test_bad_input_rejected_like_reference = bad_input_test(BAD, own_messages={"lr vector"})


@pytest.mark.parametrize(("device", "backend"), targets())
def test_nothing_half_applied(device, backend):
    param, grad = torch.ones(8, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError):
        backend_module(backend, device).sgd_step_(param, grad, None, 0.1, momentum=0.9)
    assert torch.equal(param, torch.ones(8, device=device))


@pytest.mark.parametrize(("device", "backend"), targets(only=FUSED))
def test_bad_scalar_tensors_rejected(device, backend):
    # The reference reads tensor scalars with .item() and accepts these; a kernel that
    # reads the scalar on the device needs one floating element on the right device.
    ops = backend_module(backend, device)
    p = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="lr as a tensor must be 0-dim"):
        ops.sgd_step_(p, p.clone(), None, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="0-dim"):
        ops.sgd_step_(p, p.clone(), None, torch.ones(1, 1, device=device))
    with pytest.raises(TypeError, match="lr as a tensor must be floating point"):
        ops.sgd_step_(p, p.clone(), None, torch.tensor(1, device=device))


# --------------------------------------------------------------------- first-order MAML: the step's own update
# The step also writes update = param after - param before (opmath) in the same pass.


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_update_sizes(device, backend, size, dtype):
    for config in (SGD_CONFIGS[0], SGD_CONFIGS[2]):  # with momentum, and plain SGD
        run_sgd(backend, device, size, dtype, update=True, **config)


test_update_unaligned = unaligned_test("sgd_step_", offsets=(1, 3, {"param": 1, "grad": 2, "update": 3}),
                                       update=True)
test_update_large = large_test("sgd_step_", update=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_update_options(device, backend, dtype):
    for config in SGD_CONFIGS:
        for size, offset in sizes(backend, OPTION_SIZES):
            run_sgd(backend, device, size, dtype, offset=offset, lr_kind="dev-f32", update=True, **config)


@property_cases(
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    maximize=st.booleans(),
    first_step=st.booleans(),
)
def test_update_property(backend, size, offset, dtype, momentum, weight_decay, maximize, first_step, seed):
    run_sgd(backend, "cpu", size, dtype, offset=offset, seed=seed, momentum=momentum, dampening=0.0,
            weight_decay=weight_decay, maximize=maximize, first_step=first_step, update=True)


def _update_size(ops, device):
    p, g, b, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p, g, b, 0.1, momentum=0.9, update=z(7, device=device))), [p, b]


def _update_dtype(ops, device):
    p, g, b, *_ = bufs(device, torch.bfloat16)
    u = torch.zeros(8, dtype=torch.bfloat16, device=device)  # bfloat16 params take a float32 update
    return (lambda: ops.sgd_step_(p, g, b, 0.1, momentum=0.9, update=u)), [p, b, u]


def _update_is_param(ops, device):
    p, g, b, *_ = bufs(device)
    return (lambda: ops.sgd_step_(p, g, b, 0.1, momentum=0.9, update=p)), [p, b]


BAD_UPDATE = {
    "update float16 for float16": refused(lambda m, d: lambda: m.sgd_step_(z(dtype=torch.float16, device=d), z(dtype=torch.float16, device=d), None, 0.1, update=z(dtype=torch.float16, device=d))),
    "update float64 for float32": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, update=z(dtype=torch.float64, device=d))),
    "update size": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, update=z(9, device=d))),
    "update 2-D": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, update=torch.zeros(2, 4, device=d))),
    "update non-contiguous": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, update=torch.zeros(16, device=d)[::2])),
    "update on another device": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, update=z(device="meta"))),
    "update int": refused(lambda m, d: lambda: m.sgd_step_(z(device=d), z(device=d), None, 0.1, update=z(dtype=torch.int32, device=d))),
    "update size, watched": _update_size,
    "update dtype, watched": _update_dtype,
    "update is param, watched": _update_is_param,
}  # fmt: skip

test_update_bad_input_rejected_like_reference = bad_input_test(BAD_UPDATE)
