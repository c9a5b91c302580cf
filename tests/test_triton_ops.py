"""The Triton backend against the reference ops.

Without a GPU these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported) on CPU tensors; with one they run the
compiled kernels on CUDA tensors.  Sizes stay small because the interpreter is slow;
under it the kernels use a block of ``INTERPRET_BLOCK`` (256) elements, so 1025
spans five programs with a one-element tail.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from reptile_fused import reference as R  # noqa: E402
from reptile_fused.backends import triton as T  # noqa: E402
from triton_numerics import assert_contract  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    T.unavailable_reason(DEVICE) is not None, reason=f"triton backend unavailable: {T.unavailable_reason(DEVICE)}"
)

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SIZES = (0, 1, 17, 1025)
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def flat(gen: torch.Generator, size: int, dtype: torch.dtype, *, offset: int = 0, positive: bool = False):
    """A contiguous 1-D buffer; with ``offset`` a view that starts ``offset`` elements into a larger one."""
    base = torch.randn(size + offset, generator=gen, dtype=torch.float64)
    if positive:
        base = base.abs()
    return base.to(device=DEVICE, dtype=dtype)[offset:]


def scalar(value: float, kind: str):
    """``value`` as a Python float, a 0-dim tensor on the buffers' device, or a float64 0-dim tensor."""
    if kind == "python":
        return value
    if kind == "tensor":
        return torch.tensor(float(value), device=DEVICE)
    if kind == "tensor64":
        return torch.tensor(float(value), device=DEVICE, dtype=torch.float64)
    if kind == "cpu-tensor":
        return torch.tensor(float(value))
    raise ValueError(kind)


def clone_in_place(t):
    """A copy with the same storage offset and strides (``clone()`` would re-align a view)."""
    if t is None:
        return None
    base = torch.empty(t.storage_offset() + t.numel(), dtype=t.dtype, device=t.device)
    return base.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def clones(*ts):
    return [clone_in_place(t) for t in ts]


def check_all(outs, refs, names):
    for out, ref, name in zip(outs, refs, names):
        if ref is not None:
            assert_contract(out, ref, name)


# --------------------------------------------------------------------------- sgd

SGD_VARIANTS = {
    "plain": dict(momentum=0.0),
    "momentum-first": dict(momentum=0.9, first_step=True),
    "momentum": dict(momentum=0.9, dampening=0.1),
    "nesterov-wd": dict(momentum=0.9, weight_decay=0.01, nesterov=True),
    "maximize-wd": dict(momentum=0.5, weight_decay=0.1, maximize=True),
}


def _sgd_case(size, dtype, variant, lr_kind, offset=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = SGD_VARIANTS[variant]
    param = flat(gen, size, dtype, offset=offset)
    grad = flat(gen, size, dtype, offset=offset)
    buf = flat(gen, size, dtype, offset=offset) if kw["momentum"] != 0 else None
    ref, out = clones(param, grad, buf), clones(param, grad, buf)
    R.sgd_step_(*ref, scalar(0.1, lr_kind), **kw)
    T.sgd_step_(*out, scalar(0.1, lr_kind), **kw)
    check_all(out, ref, ("param", "grad", "momentum_buffer"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_sgd_sizes(size, dtype):
    _sgd_case(size, dtype, "nesterov-wd", "python")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", SGD_VARIANTS)
@pytest.mark.parametrize("lr_kind", ("python", "tensor"))
def test_sgd_variants(variant, lr_kind, dtype):
    _sgd_case(17, dtype, variant, lr_kind)


# --------------------------------------------------------------------------- adam

ADAM_VARIANTS = {
    "plain": dict(),
    "amsgrad-wd": dict(amsgrad=True, weight_decay=0.01),
    "maximize": dict(maximize=True),
    # 1 - beta1 >= 0.5 takes the other branch of torch's lerp.
    "low-beta1": dict(beta1=0.3, beta2=0.9, eps=1e-6),
}


def _adam_case(size, dtype, variant, step, step_kind, lr_kind, offset=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    kw = ADAM_VARIANTS[variant]
    param = flat(gen, size, dtype, offset=offset)
    grad = flat(gen, size, dtype, offset=offset)
    exp_avg = flat(gen, size, dtype, offset=offset)
    exp_avg_sq = flat(gen, size, dtype, offset=offset, positive=True)
    vmax = flat(gen, size, dtype, offset=offset, positive=True) if kw.get("amsgrad") else None
    ref, out = clones(param, grad, exp_avg, exp_avg_sq, vmax), clones(param, grad, exp_avg, exp_avg_sq, vmax)
    R.adam_step_(*ref, scalar(step, step_kind), scalar(1e-2, lr_kind), **kw)
    T.adam_step_(*out, scalar(step, step_kind), scalar(1e-2, lr_kind), **kw)
    check_all(out, ref, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_adam_sizes(size, dtype):
    _adam_case(size, dtype, "amsgrad-wd", 3, "python", "python")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ADAM_VARIANTS)
@pytest.mark.parametrize(
    ("step", "step_kind", "lr_kind"),
    [(1, "python", "python"), (7, "tensor", "tensor"), (1, "tensor", "python"), (1000, "tensor64", "tensor")],
)
def test_adam_variants(variant, step, step_kind, lr_kind, dtype):
    _adam_case(17, dtype, variant, step, step_kind, lr_kind)


# --------------------------------------------------------------------------- task_end / meta_update


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_task_end(size, dtype):
    gen = torch.Generator().manual_seed(2)
    param, anchor = flat(gen, size, dtype), flat(gen, size, dtype)
    acc = flat(gen, size, opmath(dtype))
    ref, out = clones(param, anchor, acc), clones(param, anchor, acc)
    R.task_end_(*ref)
    T.task_end_(*out)
    # Exact: one addition in the accumulator's dtype and a copy.
    for o, r in zip(out, ref):
        assert torch.equal(o, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("n", "kind"), [(1, "python"), (5, "python"), (5, "tensor"), (1, "tensor")])
def test_meta_update(size, dtype, n, kind):
    gen = torch.Generator().manual_seed(3)
    param, anchor = flat(gen, size, dtype), flat(gen, size, dtype)
    acc = flat(gen, size, opmath(dtype)) * n
    ref, out = clones(param, anchor, acc), clones(param, anchor, acc)
    R.meta_update_(*ref, scalar(0.7, kind), scalar(float(n), kind))
    T.meta_update_(*out, scalar(0.7, kind), scalar(float(n), kind))
    check_all(out, ref, ("param", "anchor", "acc"))
    assert not out[2].any(), "acc must be zeroed"


# --------------------------------------------------------------------------- batched


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", (1, 5))
@pytest.mark.parametrize(("write_back", "kind"), [(True, "python"), (False, "tensor")])
def test_batched_meta_update(size, dtype, n, write_back, kind):
    gen = torch.Generator().manual_seed(4)
    theta = flat(gen, size, dtype)
    tasks = flat(gen, n * size, dtype).view(n, size)
    ref, out = clones(theta, tasks), clones(theta, tasks)
    R.batched_meta_update_(*ref, scalar(0.4, kind), write_back=write_back)
    T.batched_meta_update_(*out, scalar(0.4, kind), write_back=write_back)
    assert_contract(out[0], ref[0], "theta")
    if write_back:
        assert torch.equal(out[1], out[0].expand_as(out[1])), "every row must hold the new theta"
    else:
        assert torch.equal(out[1], tasks), "tasks must be untouched without write_back"


# --------------------------------------------------------------------------- layout, scalars, rounding


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("float32", "float16"))
def test_unaligned_views(dtype):
    """Buffers that start at odd element offsets into their storage."""
    _sgd_case(1025, dtype, "momentum", "tensor", offset=3)
    _adam_case(1025, dtype, "amsgrad-wd", 2, "python", "python", offset=5)
    gen = torch.Generator().manual_seed(5)
    param, anchor, acc = flat(gen, 1025, dtype, offset=1), flat(gen, 1025, dtype, offset=7), flat(gen, 1025, opmath(dtype), offset=3)
    assert clone_in_place(param).storage_offset() == 1
    ref, out = clones(param, anchor, acc), clones(param, anchor, acc)
    R.task_end_(*ref)
    T.task_end_(*out)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    R.meta_update_(*ref, 0.5, 3)
    T.meta_update_(*out, 0.5, 3)
    check_all(out, ref, ("param", "anchor", "acc"))
    theta = flat(gen, 1025, dtype, offset=1)
    tasks = flat(gen, 3 * 1025, dtype, offset=1).view(3, 1025)
    ref, out = clones(theta, tasks), clones(theta, tasks)
    R.batched_meta_update_(*ref, 0.3)
    T.batched_meta_update_(*out, 0.3)
    assert_contract(out[0], ref[0], "theta")
    assert torch.equal(out[1], out[0].expand_as(out[1]))


def test_sizes_span_several_programs():
    """Guards the claim that SIZES exercise multi-program grids and masked tails under the interpreter."""
    from reptile_fused.backends.triton import kernels as K

    if K.interpreting():
        assert max(SIZES) > 4 * K.INTERPRET_BLOCK and max(SIZES) % K.INTERPRET_BLOCK != 0


def test_tensor_scalar_is_read_at_launch():
    """A 0-dim tensor scalar is loaded by the kernel each call (what a CUDA graph replay relies on)."""
    lr = torch.tensor(0.5, device=DEVICE)
    param = torch.zeros(17, device=DEVICE)
    grad = torch.ones(17, device=DEVICE)
    T.sgd_step_(param, grad, None, lr)
    lr.fill_(0.25)
    T.sgd_step_(param, grad, None, lr)
    assert torch.equal(param, torch.full_like(param, -0.75))


def test_float64_hyperparameters_are_not_rounded_to_float32():
    """Triton passes float arguments as float32; float64 buffers must see the float64 value."""
    param = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    grad = torch.ones(3, dtype=torch.float64, device=DEVICE)
    T.sgd_step_(param, grad, None, 0.1)
    assert torch.equal(param, torch.full_like(param, -0.1))
    anchor = torch.ones(3, dtype=torch.float64, device=DEVICE)
    acc = torch.full((3,), 6.0, dtype=torch.float64, device=DEVICE)
    T.meta_update_(param, anchor, acc, 1 / 3, 3)
    assert torch.equal(param, torch.full_like(param, 1 + (1 / 3) * (6.0 / 3 - 1)))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 overflow to inf
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_16bit_store_rounds_to_nearest_even(dtype):
    """meta_update_ with meta_lr = 1, n = 1 stores acc itself: the result must be acc rounded to nearest even."""
    gen = torch.Generator().manual_seed(6)
    acc = torch.randn(1025, generator=gen).to(DEVICE)
    acc[:4] = torch.tensor([float("inf"), -float("inf"), 3.4e38, 1e-40])
    anchor = torch.zeros(1025, dtype=dtype, device=DEVICE)
    param = torch.empty_like(anchor)
    T.meta_update_(param, anchor, acc.clone(), 1.0, 1)
    assert torch.equal(param, acc.to(dtype))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's numpy
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_16bit_values_round_trip(dtype):
    """meta_update_ with meta_lr = 0 rewrites the anchor's own values: every one, subnormals and infinities
    included, must survive the widening load and the rounding store unchanged."""
    finfo = torch.finfo(dtype)
    special = [0.0, -0.0, finfo.tiny, finfo.tiny / 8, -finfo.tiny / 2, finfo.max, -finfo.max, float("inf"), -float("inf")]
    anchor = torch.cat([torch.tensor(special), torch.randn(32)]).to(device=DEVICE, dtype=dtype)
    param = torch.empty_like(anchor)
    acc = torch.zeros(anchor.numel(), device=DEVICE)
    T.meta_update_(param, anchor, acc, 0.0, 1)
    finite = anchor.isfinite()
    assert torch.equal(param[finite], anchor[finite])
    # inf + 0 * (0 - inf) is NaN in the reference too.
    assert param[~finite].isnan().all()


def test_nan_propagates_like_reference():
    param = torch.tensor([1.0, float("nan"), 2.0], device=DEVICE)
    grad = torch.tensor([float("nan"), 1.0, 1.0], device=DEVICE)
    ea, eas, vmax = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    ref, out = clones(param, grad, ea, eas, vmax), clones(param, grad, ea, eas, vmax)
    R.adam_step_(*ref, 1, 0.1, amsgrad=True)
    T.adam_step_(*out, 1, 0.1, amsgrad=True)
    check_all(out, ref, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


# --------------------------------------------------------------------------- bad input


def _bad_calls():
    """(name, thunk factory) pairs: each factory gets an ops module and returns (call, buffers to watch)."""
    def buffers(dtype=torch.float32, n=8):
        return [torch.randn(n, device=DEVICE, dtype=dtype) for _ in range(5)]

    def sgd_shape(ops):
        p, g, b, *_ = buffers()
        return (lambda: ops.sgd_step_(p, g[:4], b, 0.1, momentum=0.9)), [p, b]

    def sgd_no_buffer(ops):
        p, g, *_ = buffers()
        return (lambda: ops.sgd_step_(p, g, None, 0.1, momentum=0.9)), [p]

    def sgd_dtype(ops):
        p, g, b, *_ = buffers()
        return (lambda: ops.sgd_step_(p, g.double(), b, 0.1, momentum=0.9)), [p, b]

    def sgd_2d(ops):
        p, g, *_ = buffers()
        p2 = p.view(2, 4)
        return (lambda: ops.sgd_step_(p2, g.view(2, 4), None, 0.1)), [p]

    def sgd_noncontiguous(ops):
        p, g, *_ = buffers(n=16)
        return (lambda: ops.sgd_step_(p[::2], g[::2], None, 0.1)), [p]

    def sgd_int(ops):
        p = torch.zeros(8, dtype=torch.int32, device=DEVICE)
        g = torch.ones(8, dtype=torch.int32, device=DEVICE)
        return (lambda: ops.sgd_step_(p, g, None, 0.1)), [p]

    def sgd_lr_vector(ops):
        p, g, *_ = buffers()
        return (lambda: ops.sgd_step_(p, g, None, torch.ones(2, device=DEVICE))), [p]

    def adam_step0(ops):
        p, g, m, v, _ = buffers()
        return (lambda: ops.adam_step_(p, g, m, v, None, 0, 0.1)), [p, m, v]

    def adam_step0_cpu_tensor(ops):
        p, g, m, v, _ = buffers()
        return (lambda: ops.adam_step_(p, g, m, v, None, torch.tensor(0.0), 0.1)), [p, m, v]

    def adam_amsgrad_no_max(ops):
        p, g, m, v, _ = buffers()
        return (lambda: ops.adam_step_(p, g, m, v, None, 1, 0.1, amsgrad=True)), [p, m, v]

    def adam_max_shape(ops):
        p, g, m, v, vmax = buffers()
        return (lambda: ops.adam_step_(p, g, m, v, vmax[:3], 1, 0.1, amsgrad=True)), [p, m, v, vmax]

    def task_end_acc_dtype(ops):
        p, a, *_ = buffers(torch.float16)
        acc = torch.zeros(8, dtype=torch.float16, device=DEVICE)
        return (lambda: ops.task_end_(p, a, acc)), [p, acc]

    def task_end_acc_size(ops):
        p, a, *_ = buffers()
        acc = torch.zeros(9, device=DEVICE)
        return (lambda: ops.task_end_(p, a, acc)), [p, acc]

    def meta_n0(ops):
        p, a, acc, *_ = buffers()
        return (lambda: ops.meta_update_(p, a, acc, 0.5, 0)), [p, acc]

    def meta_anchor_dtype(ops):
        p, a, acc, *_ = buffers()
        return (lambda: ops.meta_update_(p, a.double(), acc, 0.5, 2)), [p, acc]

    def batched_shape(ops):
        theta = torch.randn(8, device=DEVICE)
        tasks = torch.randn(3, 7, device=DEVICE)
        return (lambda: ops.batched_meta_update_(theta, tasks, 0.5)), [theta, tasks]

    def batched_empty(ops):
        theta = torch.randn(8, device=DEVICE)
        tasks = torch.randn(0, 8, device=DEVICE)
        return (lambda: ops.batched_meta_update_(theta, tasks, 0.5)), [theta]

    def batched_dtype(ops):
        theta = torch.randn(8, device=DEVICE)
        tasks = torch.randn(2, 8, device=DEVICE, dtype=torch.float64)
        return (lambda: ops.batched_meta_update_(theta, tasks, 0.5)), [theta, tasks]

    return [(f.__name__, f) for f in (
        sgd_shape, sgd_no_buffer, sgd_dtype, sgd_2d, sgd_noncontiguous, sgd_int, sgd_lr_vector,
        adam_step0, adam_step0_cpu_tensor, adam_amsgrad_no_max, adam_max_shape,
        task_end_acc_dtype, task_end_acc_size, meta_n0, meta_anchor_dtype,
        batched_shape, batched_empty, batched_dtype,
    )]  # fmt: skip


# The reference reads tensor scalars with its own check; fused backends use
# _validate.check_scalar_tensor, which words the same rejection differently.
_OWN_MESSAGES = {"sgd_lr_vector"}


@pytest.mark.parametrize(("name", "factory"), _bad_calls(), ids=[n for n, _ in _bad_calls()])
def test_bad_input_rejected_like_reference_and_untouched(name, factory):
    torch.manual_seed(0)
    ref_call, _ = factory(R)
    with pytest.raises(Exception) as ref_error:
        ref_call()
    call, watched = factory(T)
    before = [w.clone() for w in watched]
    with pytest.raises(ref_error.type) as error:
        call()
    if name not in _OWN_MESSAGES:
        assert str(error.value) == str(ref_error.value)
    for w, b in zip(watched, before):
        assert torch.equal(w, b), "nothing may be written before the input is rejected"


def test_scalar_tensor_checks():
    p, g = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    with pytest.raises(TypeError, match="floating point"):
        T.sgd_step_(p, g, None, torch.tensor(1, device=DEVICE))
    with pytest.raises(ValueError, match="0-dim"):
        T.sgd_step_(p, g, None, torch.ones(1, 1, device=DEVICE))


def test_cpu_scalar_tensor_beside_buffers():
    """A CPU 0-dim scalar is accepted whatever the buffers' device (read on the host when they are not on the CPU)."""
    p, g = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    T.sgd_step_(p, g, None, scalar(0.5, "cpu-tensor"))
    assert torch.equal(p, torch.full_like(p, -0.5))


def test_backend_seam():
    from reptile_fused.backends import available_backends, get_backend

    assert get_backend("triton", DEVICE) is T
    if DEVICE.type == "cpu":
        # The interpreter is a testing tool: "auto" must never pick it.
        assert get_backend("auto", "cpu").__name__ != T.__name__
        assert "triton" in available_backends("cpu")


def test_ops_registered_for_torch_compile():
    for name in ("sgd_step_", "adam_step_", "task_end_", "meta_update_", "batched_meta_update_"):
        assert hasattr(torch.ops.reptile_fused_triton, name)


def test_variant_tables_cover_every_flag():
    """Keeps the variant tables honest: every SGD and Adam flag is set by some variant."""
    sgd_keys = set(itertools.chain.from_iterable(SGD_VARIANTS.values()))
    assert {"momentum", "dampening", "weight_decay", "nesterov", "maximize", "first_step"} <= sgd_keys
    adam_keys = set(itertools.chain.from_iterable(ADAM_VARIANTS.values()))
    assert {"amsgrad", "weight_decay", "maximize", "beta1", "beta2", "eps"} <= adam_keys
