"""What every op test shares: the backends to run (the implementation is a parameter,
as in PyTorch's test_optim.py), the inputs (awkward sizes, unaligned offsets, scalars
given as numbers or tensors), and one runner per op that applies the reference and a
backend to identical copies and holds every output to the numerics contract
(tests/numerics.py).

Every backend that can run on the CPU runs here ("triton" under its interpreter,
tests/conftest.py); the ``cuda`` cases are gpu-marked (skipped without a GPU, run by
``make gpu-check``).  The Triton interpreter is slow, so Triton gets smaller sizes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numerics import DTYPES, Bound, assert_contract, assert_within, dtype_id, opmath  # noqa: F401 (DTYPES, dtype_id: for the op files)
from reptile_fused import reference as ref
from reptile_fused.backends import BACKENDS, available_backends, get_backend
from reptile_fused.backends.op_table import OP_NAMES as OPS  # noqa: F401 (for the op files)

CPU_BACKENDS = available_backends("cpu")
FUSED = ("cpp", "triton")

# Sizes: empty, one element, odd, a vector width, a vector plus a tail, several blocks.
# The reference against itself only checks what the runners assert beyond the numbers
# (a restored anchor, a zeroed accumulator, ...), so it gets the small sizes too.
SIZES = {"default": (0, 1, 3, 4, 17, 1023, 65537), "triton": (0, 1, 3, 4, 17, 1025)}
SIZES["reference"] = SIZES["triton"]
LARGE = {"default": 3_000_001, "triton": 8195, "reference": 8195}
# (size, offset) pairs each option of an op runs at.
OPTION_SIZES = {"default": ((17, 0), (1023, 0), (517, 1)), "triton": ((17, 0), (517, 1))}


# Property-based cases: any size up to a few blocks, any offset within a vector.
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES_ST = st.integers(0, 3000)
OFFSETS = st.integers(0, 7)


def sizes(backend: str, table: dict = SIZES):
    return table.get(backend, table["default"])


def _cuda_backends() -> list[str]:
    # Without a GPU every backend is listed, so the gpu-marked cases are collected
    # and reported as skipped instead of vanishing.
    return available_backends("cuda") if torch.cuda.is_available() else list(BACKENDS)


def targets(*, cuda: bool = True, only=None, per_backend=None):
    """``pytest.param``s of ``(device, backend)`` for every backend that can run on the
    CPU and, gpu-marked, on CUDA; with ``per_backend(backend)`` (an iterable), one more
    value per case: ``(device, backend, value)``.  ``only`` keeps those backends."""
    pairs = [("cpu", b) for b in CPU_BACKENDS]
    if cuda:
        pairs += [("cuda", b) for b in _cuda_backends()]
    out = []
    for device, backend in pairs:
        if only is not None and backend not in only:
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        values = [()] if per_backend is None else [(v,) for v in per_backend(backend)]
        for v in values:
            label = "-".join([device, backend, *map(str, v)])
            out.append(pytest.param(device, backend, *v, id=label, marks=marks))
    return out


def backend_module(name: str, device: str):
    return get_backend(name, device)


def config_id(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items())


# sgd_step_ options: every flag, alone and together (the first two also run at every
# size; tests/backends/test_cpp.py holds the C++ kernels to torch.optim.SGD on each).
SGD_CONFIGS = [
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(momentum=0.9, weight_decay=0.01, nesterov=True, dampening=0.0),
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0),
    dict(momentum=0.0, weight_decay=0.1, maximize=True),
    dict(momentum=0.9, dampening=0.0, first_step=True),
    dict(momentum=0.9, first_step=True, dampening=0.0, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.5, weight_decay=0.01, first_step=True, nesterov=True),
    dict(momentum=0.9, dampening=0.0, nesterov=True),
    dict(momentum=0.5, dampening=0.3, weight_decay=0.05, maximize=True),
    dict(momentum=0.5, dampening=0.0, weight_decay=0.1, maximize=True),
]


# --------------------------------------------------------------------- inputs


def buffer(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` copied into a bigger allocation starting ``offset`` elements in, so an
    odd offset breaks 16-byte alignment the way a flat-buffer slice does."""
    base = torch.empty(values.numel() + offset + 1, dtype=values.dtype, device=values.device)
    view = base[offset : offset + values.numel()]
    view.copy_(values.reshape(-1))
    assert view.storage_offset() == offset
    return view


def randn(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, offset: int = 0, scale: float = 1.0):
    return buffer((torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device), offset)


def rand(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, offset: int = 0):
    return buffer(torch.rand(n, generator=gen, dtype=torch.float64).to(dtype).to(device), offset)


def twins(tensors: dict[str, torch.Tensor | None], offset: int | dict[str, int]):
    """Two independent copies of the inputs for the two backends, each at ``offset``
    (one for all, or one per name)."""

    def copy(name, t):
        at = offset.get(name, 0) if isinstance(offset, dict) else offset
        return None if t is None else buffer(t.clone(), at)

    return ({k: copy(k, t) for k, t in tensors.items()}, {k: copy(k, t) for k, t in tensors.items()})


# How a scalar argument (lr, step, meta_lr, n) is given.  Every value used with a
# bfloat16 kind is exact in bfloat16.
SCALAR_KINDS = ("python", "cpu-f32", "cpu-f64-1elem", "dev-f32", "dev-f64", "dev-bf16")


def scalar(value: float, kind: str, device: str):
    """``value`` as a Python number or a 0-dim (or one-element) tensor of some dtype, on
    the buffers' device or the CPU."""
    if kind == "python":
        return value
    if kind == "cpu-f32":
        return torch.tensor(float(value), dtype=torch.float32)
    if kind == "cpu-f64-1elem":
        return torch.tensor([float(value)], dtype=torch.float64)
    dtype = {"dev-f32": torch.float32, "dev-f64": torch.float64, "dev-bf16": torch.bfloat16}[kind]
    return torch.tensor(float(value), dtype=dtype, device=device)


def assert_all(got: dict, want: dict, names, backend: str) -> None:
    for k in names:
        if want[k] is not None:
            assert_contract(got[k], want[k], k, backend)


# First-order MAML: a step op records its own update, task_end_ / batched_meta_update_
# count a task as anchor + update.


def unread(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A buffer the op must not read (NaN would show through) and may have to write."""
    return torch.full((n,), float("nan"), dtype=dtype, device=device)


def assert_update(got: dict, old_param: torch.Tensor, backend: str) -> None:
    """A step's recorded update is exactly the move of the parameter it stored:
    ``opmath(new param) - opmath(old param)``, one subtraction in opmath.  Together
    with the parameter's own contract against the reference this is the update's
    contract: compared with the reference's update directly, a 16-bit parameter that
    rounds the other way (which the contract allows, rarely) would be a whole 16-bit ulp
    off in a float32 buffer."""
    opm = got["update"].dtype
    want = got["param"].to(opm) - old_param.to(opm)
    assert_within(got["update"], want, Bound(), f"update ({backend})")


# --------------------------------------------------------------------- one runner per op
# Each builds inputs, runs the reference and ``backend`` on copies, and compares every output.


def run_sgd(backend, device, n, dtype, *, offset=0, seed=0, lr=0.1, lr_kind="python", momentum=0.9,
            dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False, first_step=False, update=False):
    """``update``: also record the step's update (first-order MAML)."""
    gen = torch.Generator().manual_seed(seed)
    t = {
        "param": randn(n, dtype, device, gen),
        "grad": randn(n, dtype, device, gen),
        "momentum_buffer": randn(n, dtype, device, gen) if momentum != 0 else None,
        "update": unread(n, opmath(dtype), device) if update else None,
    }
    a, b = twins(t, offset)
    old_param = b["param"].clone()
    kw = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
              maximize=maximize, first_step=first_step)
    ref.sgd_step_(a["param"], a["grad"], a["momentum_buffer"], scalar(lr, lr_kind, device), **kw,
                  update=a["update"])
    backend_module(backend, device).sgd_step_(
        b["param"], b["grad"], b["momentum_buffer"], scalar(lr, lr_kind, device), **kw, update=b["update"]
    )
    assert_all(b, a, ("param", "grad", "momentum_buffer"), backend)
    if update:
        assert_update(b, old_param, backend)


def run_adam(backend, device, n, dtype, *, offset=0, seed=0, step=3, step_kind="python", lr=1e-2,
             lr_kind="python", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
             update=False):
    """``update``: also record the step's update (first-order MAML)."""
    gen = torch.Generator().manual_seed(seed)
    v = rand(n, dtype, device, gen)
    t = {
        "param": randn(n, dtype, device, gen),
        "grad": randn(n, dtype, device, gen),
        "exp_avg": randn(n, dtype, device, gen, scale=0.1),
        "exp_avg_sq": v,
        "max_exp_avg_sq": (v + rand(n, dtype, device, gen) * 0.5).to(dtype) if amsgrad else None,
        "update": unread(n, opmath(dtype), device) if update else None,
    }
    a, b = twins(t, offset)
    old_param = b["param"].clone()
    kw = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    ref.adam_step_(*(a[k] for k in names), scalar(step, step_kind, device), scalar(lr, lr_kind, device), **kw,
                   update=a["update"])
    backend_module(backend, device).adam_step_(
        *(b[k] for k in names), scalar(step, step_kind, device), scalar(lr, lr_kind, device), **kw,
        update=b["update"],
    )
    assert_all(b, a, names, backend)
    if update:
        assert_update(b, old_param, backend)


def _meta_inputs(n, dtype, device, seed, acc_scale=3.0):
    """param, anchor and a float32/64 task accumulator, as task_end_ and meta_update_ take them."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "param": randn(n, dtype, device, gen),
        "anchor": randn(n, dtype, device, gen),
        "acc": randn(n, opmath(dtype), device, gen, scale=acc_scale),
    }


def run_task_end(backend, device, n, dtype, *, offset=0, seed=0, update=False):
    """``update``: the task counts as anchor + update (first-order MAML), and the
    parameter (NaN here) is not read."""
    t = _meta_inputs(n, dtype, device, seed)
    if update:
        t["param"] = unread(n, dtype, device)
        t["update"] = randn(n, opmath(dtype), device, torch.Generator().manual_seed(seed + 1), scale=0.01)
    a, b = twins(t, offset)
    ref.task_end_(a["param"], a["anchor"], a["acc"], a.get("update"))
    backend_module(backend, device).task_end_(b["param"], b["anchor"], b["acc"], b.get("update"))
    assert_all(b, a, ("param", "anchor", "acc"), backend)
    # Exact: one addition (two with an update) in the accumulator's dtype and a copy.
    for k in t:
        assert torch.equal(b[k], a[k]), f"task_end_ must be exact: {k}"
    assert torch.equal(b["param"], t["anchor"]), "task_end_ must restore the anchor exactly"
    if update:
        assert torch.equal(b["update"], t["update"]), "task_end_ must not write the update"


def run_meta_update(backend, device, n, dtype, *, offset=0, seed=0, meta_lr=0.7, tasks=3, kind="python"):
    # acc holds the sum of ``tasks`` adapted copies: O(1) values times ``tasks``.
    a, b = twins(_meta_inputs(n, dtype, device, seed, acc_scale=float(tasks)), offset)
    ref.meta_update_(a["param"], a["anchor"], a["acc"], scalar(meta_lr, kind, device), scalar(tasks, kind, device))
    backend_module(backend, device).meta_update_(
        b["param"], b["anchor"], b["acc"], scalar(meta_lr, kind, device), scalar(tasks, kind, device)
    )
    assert_all(b, a, ("param", "anchor", "acc"), backend)
    assert not b["acc"].any(), "meta_update_ must zero the accumulator"


def run_batched(backend, device, n, dtype, *, rows=5, offset=0, seed=0, meta_lr=0.5, kind="python",
                write_back=True, updates=False):
    """``updates``: row i counts as theta + updates[i] (first-order MAML), and the rows
    (NaN here) are not read."""
    gen = torch.Generator().manual_seed(seed)
    theta = randn(n, dtype, device, gen)
    tasks = unread(rows * n, dtype, device) if updates else randn(rows * n, dtype, device, gen)
    ups = randn(rows * n, opmath(dtype), device, gen, scale=0.01) if updates else None

    def copies():
        u = None if ups is None else buffer(ups.clone(), offset).view(rows, n)
        return buffer(theta.clone(), offset), buffer(tasks.clone(), offset).view(rows, n), u

    (a_t, a_r, a_u), (b_t, b_r, b_u) = copies(), copies()
    ref.batched_meta_update_(a_t, a_r, scalar(meta_lr, kind, device), write_back=write_back, updates=a_u)
    backend_module(backend, device).batched_meta_update_(b_t, b_r, scalar(meta_lr, kind, device),
                                                         write_back=write_back, updates=b_u)
    assert_contract(b_t, a_t, "theta", backend)
    assert_contract(b_r, a_r, "tasks", backend)
    if write_back:
        assert torch.equal(b_r, b_t.unsqueeze(0).expand_as(b_r)), "write_back must copy the stored theta"
    else:
        torch.testing.assert_close(b_r, tasks.view(rows, n), rtol=0, atol=0, equal_nan=True,
                                   msg="without write_back the rows must stay untouched")
    if updates:
        assert torch.equal(b_u, ups.view(rows, n)), "batched_meta_update_ must not write the updates"


RUNNERS = {
    "sgd_step_": run_sgd,
    "adam_step_": run_adam,
    "task_end_": run_task_end,
    "meta_update_": run_meta_update,
    "batched_meta_update_": run_batched,
}


# --------------------------------------------------------------------- bad input


def assert_rejected_like_reference(backend, device, factory, own_message=False):
    """``factory(ops, device) -> (call, buffers to watch)``: the backend raises what the
    reference raises (same type and, unless ``own_message``, same message) before it
    writes anything."""
    torch.manual_seed(0)
    ref_call, _ = factory(ref, device)
    with pytest.raises(Exception) as want:
        ref_call()
    torch.manual_seed(0)
    call, watched = factory(backend_module(backend, device), device)
    before = [w.clone() for w in watched]
    with pytest.raises(want.type) as got:
        call()
    if not own_message:
        assert str(got.value) == str(want.value)
    for w, b in zip(watched, before):
        assert torch.equal(w, b), "nothing may be written before the input is rejected"


def z(n=8, dtype=torch.float32, device="cpu"):
    return torch.zeros(n, dtype=dtype, device=device)


def bufs(device, dtype=torch.float32, n=8, count=5):
    """``count`` random buffers of ``n`` elements (inputs for a call that must be refused)."""
    return [torch.randn(n, device=device, dtype=dtype) for _ in range(count)]


def refused(make_call):
    """A bad-input case that watches nothing: ``make_call(ops, device)`` is the call."""
    return lambda ops, device: (make_call(ops, device), [])


# --------------------------------------------------------------------- torch.optim twins

SHAPES = [(7, 3), (5,), (2, 3, 4), (1,), (33,)]


def flat_problem(dtype, seed=0):
    """Parameters of several shapes and twelve steps of gradients for them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(12)]
    return params, grads


def cat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# --------------------------------------------------------------------- tests every op file has
# Each returns a parametrized test function; an op file binds it to a test_ name.


def large_test(op: str, **options):
    """One buffer of several million elements (Triton and the reference: a few blocks);
    ``options`` go to the op's runner."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
    @pytest.mark.parametrize(("device", "backend"), targets())
    def test_large(device, backend, dtype):
        RUNNERS[op](backend, device, sizes(backend, LARGE), dtype, offset=1, **options)

    return test_large


def unaligned_test(op: str, offsets=(1, 3), also=(), **common):
    """Buffers starting off 16-byte boundaries (as flat-buffer segments do): sizes 5, 33
    and 4099 at each offset, then each ``(size, options)`` of ``also`` (whose options
    may name an offset of their own); ``common`` options go to every run."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("offset", offsets, ids=lambda o: "mixed" if isinstance(o, dict) else str(o))
    @pytest.mark.parametrize(("device", "backend"), targets())
    def test_unaligned(device, backend, offset, dtype):
        for size in (5, 33, 4099):
            RUNNERS[op](backend, device, size, dtype, offset=offset, seed=size, **common)
        for size, options in also:
            RUNNERS[op](backend, device, size, dtype, **{"offset": offset, **common, **options})

    return test_unaligned


def bad_input_test(cases: dict, own_messages=frozenset()):
    """Each of ``cases`` (name -> factory, see ``assert_rejected_like_reference``) on every
    backend: the reference's exception type and message (a fused backend may word those
    named in ``own_messages`` its own way), raised before anything is written."""

    @pytest.mark.parametrize("case", cases)
    @pytest.mark.parametrize(("device", "backend"), targets())
    def test_bad_input_rejected_like_reference(device, backend, case):
        own = backend != "reference" and case in own_messages
        assert_rejected_like_reference(backend, device, cases[case], own_message=own)

    return test_bad_input_rejected_like_reference


def scalars_test(op: str, kind_args=("kind",), **options):
    """The op's scalar arguments (those whose kinds ``kind_args`` name) as 0-dim or
    one-element tensors of several dtypes, on the buffers' device or the CPU, give what
    the reference gives."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
    @pytest.mark.parametrize(("device", "backend"), targets())
    def test_scalars_as_tensors(device, backend, dtype):
        for kind in SCALAR_KINDS:
            RUNNERS[op](backend, device, 129, dtype, seed=5, **dict.fromkeys(kind_args, kind), **options)

    return test_scalars_as_tensors


def property_cases(**strategies):
    """Decorates a property-based test: it runs on every CPU backend, for hypothesis-drawn
    ``size``, ``offset``, ``dtype`` and ``seed`` and whatever ``strategies`` draw."""

    def wrap(test):
        drawn = given(size=SIZES_ST, offset=OFFSETS, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
                      **strategies)
        return pytest.mark.parametrize("backend", CPU_BACKENDS)(SETTINGS(drawn(test)))

    return wrap
