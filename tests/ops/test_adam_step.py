"""adam_step_: the reference against torch.optim.Adam, and every backend against the
reference (every dtype, awkward sizes and alignments, every option, scalars as numbers
or tensors, property-based cases, NaN, bad input)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import strategies as st

from ops.cases import (
    CPU_BACKENDS, DTYPES, OPTION_SIZES, backend_module, bad_input_test, bufs, cat, config_id, dtype_id, flat_problem,
    large_test, opmath, property_cases, rand, randn, refused, run_adam, scalar, scalars_test, sizes, targets, twins,
    unaligned_test, unread, z,
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


# --------------------------------------------------------------------- fused=True: torch.optim.Adam(fused=True)
# A correctly rounded square root, and each tensor's scalar tail by its own rule
# (csrc/element_math.h: adam_moments_fused_tail), so where the tensors lie (spans)
# matters.  On the CPU both exact backends equal torch's fused Adam bit for bit, in
# every dtype (torch's fused CPU kernel computes 16-bit tensors in float32 too).

EXACT_CPU = [b for b in ("reference", "cpp") if b in CPU_BACKENDS]
# Awkward tensor sizes: smaller than a vector, a vector plus a tail, several blocks.
SPAN_SIZES = (7, 33, 5, 3, 1, 231, 16, 165, 1000, 4105)
FUSED_OPTIONS = TORCH_OPTIONS + [dict(betas=(0.3, 0.9), weight_decay=0.1, amsgrad=True, maximize=False)]


def packed(sizes, align=16):
    """(offset, numel) of tensors of ``sizes`` packed as FlatBuffer packs them, and the buffer's numel."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // align) * align
    return list(zip(offsets, sizes)), total


def flat_spans(pieces):
    return tuple(x for piece in pieces for x in piece)


@pytest.mark.parametrize("backend", EXACT_CPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", FUSED_OPTIONS, ids=str)
def test_fused_matches_torch_fused_adam(backend, dtype, opts):
    pieces, total = packed(SPAN_SIZES)
    gen = torch.Generator().manual_seed(3)
    flat = torch.zeros(total, dtype=dtype)
    for o, n in pieces:
        flat[o : o + n] = torch.randn(n, generator=gen).to(dtype)
    theirs = [flat[o : o + n].clone().requires_grad_() for o, n in pieces]
    torch_opt = torch.optim.Adam(theirs, lr=0.01, eps=1e-6, fused=True, **opts)
    state = {k: torch.zeros_like(flat) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    beta1, beta2 = opts["betas"]
    ops = backend_module(backend, "cpu")
    for step in range(1, 4):
        grad = torch.zeros_like(flat)
        for p, (o, n) in zip(theirs, pieces):
            grad[o : o + n] = torch.randn(n, generator=gen).to(dtype)
            p.grad = grad[o : o + n].clone()
        torch_opt.step()
        ops.adam_step_(
            flat, grad, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] if opts["amsgrad"] else None,
            step, 0.01, beta1=beta1, beta2=beta2, eps=1e-6, weight_decay=opts["weight_decay"],
            amsgrad=opts["amsgrad"], maximize=opts["maximize"], fused=True, spans=flat_spans(pieces),
        )  # fmt: skip
    for p, (o, n) in zip(theirs, pieces):
        assert torch.equal(flat[o : o + n], p.detach()), (o, n)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if opts["amsgrad"] else ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][o : o + n], torch_opt.state[p][key]), (key, o, n)


def run_fused_pair(dtype, spans, total, *, offset=0, seed=0, update=False, step=3, step_kind="python", lr=1e-2,
                   lr_kind="python", **kw):
    """cpp and the reference, fused, on identical buffers whose every element (padding
    between the spans too) holds data: they must agree bit for bit, and leave what no
    span covers untouched (its update 0)."""
    gen = torch.Generator().manual_seed(seed)
    v = rand(total, dtype, "cpu", gen)
    t = {
        "param": randn(total, dtype, "cpu", gen),
        "grad": randn(total, dtype, "cpu", gen),
        "exp_avg": randn(total, dtype, "cpu", gen, scale=0.1),
        "exp_avg_sq": v,
        "max_exp_avg_sq": (v + rand(total, dtype, "cpu", gen) * 0.5).to(dtype) if kw.get("amsgrad") else None,
        "update": unread(total, opmath(dtype), "cpu") if update else None,
    }
    a, b = twins(t, offset)
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for ops, bufs_ in ((ref, a), (backend_module("cpp", "cpu"), b)):
        ops.adam_step_(*(bufs_[k] for k in names), scalar(step, step_kind, "cpu"), scalar(lr, lr_kind, "cpu"),
                       update=bufs_["update"], fused=True, spans=spans, **kw)
    for k in t:
        if t[k] is not None:
            assert torch.equal(a[k], b[k]) or (a[k].isnan() == b[k].isnan()).all() and torch.equal(
                a[k].nan_to_num(), b[k].nan_to_num()
            ), k
    covered = torch.zeros(total, dtype=torch.bool)
    for o, n in zip(spans[0::2], spans[1::2]) if spans is not None else [(0, total)]:
        covered[o : o + n] = True
    for k in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(b[k][~covered], t[k][~covered]), f"{k} outside the spans must be left as it is"
    if update:
        assert not b["update"][~covered].any(), "the update outside the spans is 0"


needs_cpp = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the cpp extension is not built")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_fused_cpp_equals_reference(dtype, config):
    pieces, total = packed(SPAN_SIZES)
    spans = flat_spans(pieces)
    run_fused_pair(dtype, spans, total, **config)
    run_fused_pair(dtype, spans, total, update=True, offset=3, **config)
    # No spans: the whole buffer is one tensor (its tail: the last numel % W elements).
    for n in (0, 1, 7, 17, 1023, 4105):
        run_fused_pair(dtype, None, n, **config)
    # Gaps before, between and after the tensors; an empty tensor.
    run_fused_pair(dtype, (5, 9, 20, 0, 20, 33, 70, 3), 90, **config)
    for step, step_kind, lr_kind in SCALARS:
        run_fused_pair(dtype, spans, total, **{**config, "step": step}, step_kind=step_kind, lr_kind=lr_kind)


@needs_cpp
def test_fused_threads_split_anywhere():
    """Threads split the buffer at any element, inside a tensor's tail too: the result is the same."""
    pieces, total = packed([12_345 + 7 * i for i in range(40)])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_fused_pair(torch.float32, flat_spans(pieces), total, amsgrad=True, weight_decay=0.01, update=True)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "spans, error, match",
    [
        ((0, 5, 3), ValueError, "pairs"),
        ((0, 5, 4, 2), ValueError, "in buffer order"),
        ((0, -1), ValueError, "in buffer order"),
        ((10, 7), ValueError, "inside the buffer"),
        ((0, 2.0), TypeError, "ints"),
        (torch.tensor([0, 2]), TypeError, "ints"),
    ],
)
@pytest.mark.parametrize("backend", EXACT_CPU)
def test_bad_spans_rejected_before_anything_changes(backend, spans, error, match):
    p, g, m, v = (torch.ones(16) for _ in range(4))
    with pytest.raises(error, match=match):
        backend_module(backend, "cpu").adam_step_(p, g, m, v, None, 1, 0.1, fused=True, spans=spans)
    assert torch.equal(p, torch.ones(16)) and torch.equal(m, torch.ones(16))


# --------------------------------------------------------------------- the denominator's quotient
# The CPU kernels divide sqrt(v) by the bias correction with a multiply and two fused
# multiply-adds (csrc/cpu/kernels_impl.h: Math::div_fixed), not a divide.  With p = 0,
# g = 0 and eps = 0 the new parameter is -(step_size * m) / quotient, so any quotient
# that differs from the divide's shows.  float32: the state v is every float in [1, 4),
# so the step's sqrt(beta2 * v) runs through the float32 significands; plus 0, inf and
# the extremes; float64: a wide random sample.


def quotient_problem(dtype):
    if dtype == torch.float32:
        bits = torch.arange(0x3F800000, 0x40800000, dtype=torch.int64).to(torch.int32)  # every float in [1, 4)
        v = bits.view(torch.float32)
    else:
        gen = torch.Generator().manual_seed(5)
        v = torch.rand(1 << 20, dtype=dtype, generator=gen) * 2.0 ** torch.randint(-60, 60, (1 << 20,), generator=gen)
    f = torch.finfo(dtype)
    return torch.cat([v, torch.tensor([0.0, float("inf"), f.tiny * f.eps, f.tiny, f.max], dtype=dtype)])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("beta2, step", [(0.999, 1), (0.999, 10), (0.999, 1000), (0.5, 3), (0.3, 1)])
def test_bias_correction_quotient_equals_the_divide(dtype, beta2, step):
    v = quotient_problem(dtype)
    kw = dict(lr=0.5, betas=(0.5, beta2), eps=0.0)
    # torch.optim.Adam(fused=True) from the same state (step - 1 steps taken).
    p = torch.zeros_like(v, requires_grad=True)
    p.grad = torch.zeros_like(v)
    torch_opt = torch.optim.Adam([p], fused=True, **kw)
    torch_opt.state[p] = {
        "step": torch.tensor(float(step - 1)), "exp_avg": torch.ones_like(v), "exp_avg_sq": v.clone(),
    }  # fmt: skip
    torch_opt.step()
    cpp = backend_module("cpp", "cpu")
    for fused, want in ((True, p.detach()), (False, None)):
        got = {name: [torch.zeros_like(v), torch.zeros_like(v), torch.ones_like(v), v.clone()] for name in ("cpp", "ref")}
        for name, ops in (("cpp", cpp), ("ref", ref)):
            ops.adam_step_(*got[name], None, step, kw["lr"], beta1=0.5, beta2=beta2, eps=0.0, fused=fused)
        if want is None:  # the for-loop arithmetic: the reference is the oracle (it equals torch's for-loop Adam)
            want = got["ref"][0]
        assert torch.equal(got["cpp"][0], want), f"fused={fused}: {(got['cpp'][0] != want).sum()} quotients differ"
