"""What only the Triton backend has: its place behind the backend seam, its ops
registered for torch.compile, and the interpreter's grid (the sizes tests/ops/ gives it
span several programs).  Its results against the reference are in tests/ops/; the
compiled kernels, autotuning and CUDA graphs in test_triton_gpu.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ops.cases import OPS, SIZES  # noqa: E402
from reptile_fused.backends import triton as T  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    T.unavailable_reason(DEVICE) is not None, reason=f"triton backend unavailable: {T.unavailable_reason(DEVICE)}"
)


def test_sizes_span_several_programs():
    """Guards the claim that Triton's sizes exercise multi-program grids and masked tails under the interpreter."""
    from reptile_fused.backends.triton import kernels as K

    if K.interpreting():
        largest = max(SIZES["triton"])
        assert largest > 4 * K.INTERPRET_BLOCK and largest % K.INTERPRET_BLOCK != 0


def test_backend_seam():
    from reptile_fused.backends import available_backends, get_backend

    assert get_backend("triton", DEVICE) is T
    if DEVICE.type == "cpu":
        # The interpreter is a testing tool: "auto" must never pick it.
        assert get_backend("auto", "cpu").__name__ != T.__name__
        assert "triton" in available_backends("cpu")


def test_ops_registered_for_torch_compile():
    for name in OPS:
        assert hasattr(torch.ops.reptile_fused_triton, name)


# --------------------------------------------------------------------------- the update buffer
# First-order MAML's optional buffer (``update`` / ``updates``): a constexpr flag picks the
# variant, so without the buffer the kernels are the ones they were before it existed.
# Its results against the reference are in tests/ops/; here what only Triton has.


class _Recorder:
    """The (kernel, argument names -> values, constexprs) of every launch, passed on to the real launch."""

    def __init__(self, monkeypatch):
        from reptile_fused.backends.triton import kernels as K

        self.launches = []
        real = K._launch

        def record(raw, tuned, n_elements, block, args, consts):
            fn = getattr(raw, "fn", raw)
            names = getattr(raw, "arg_names", None) or fn.arg_names
            self.launches.append((fn.__name__, dict(zip(names, args)), dict(consts)))
            return real(raw, tuned, n_elements, block, args, consts)

        monkeypatch.setattr(K, "_launch", record)


def _op_calls(update: bool):
    """One call of each op that takes an update buffer, with it or without it."""
    p, g = torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE)
    u = torch.zeros(300, device=DEVICE) if update else None
    tasks = torch.randn(2, 300, device=DEVICE)
    return [
        ("_sgd_kernel", "update_ptr", lambda: T.sgd_step_(p, g, torch.zeros(300, device=DEVICE), 0.1, momentum=0.9, update=u)),
        ("_adam_kernel", "update_ptr",
         lambda: T.adam_step_(p, g, torch.zeros(300, device=DEVICE), torch.ones(300, device=DEVICE), None, 1, 0.1, update=u)),
        ("_task_end_kernel", "update_ptr", lambda: T.task_end_(p, g.clone(), torch.zeros(300, device=DEVICE), u)),
        ("_batched_meta_update_kernel", "updates_ptr",
         lambda: T.batched_meta_update_(p, tasks, 0.5, updates=None if u is None else torch.zeros(2, 300, device=DEVICE))),
    ]  # fmt: skip


@pytest.mark.parametrize("update", (False, True), ids=("without", "with"))
def test_update_buffer_is_a_constexpr_variant(monkeypatch, update):
    """Without the buffer: the flag off and no pointer at all (None is a constexpr, so the
    kernel has no extra argument); with it: the flag on and the buffer itself."""
    rec = _Recorder(monkeypatch)
    for kernel, ptr, call in _op_calls(update):
        rec.launches.clear()
        call()
        ((name, args, consts),) = rec.launches
        assert name == kernel
        flag = "HAS_UPDATES" if ptr == "updates_ptr" else "HAS_UPDATE"
        assert consts[flag] is update, kernel
        assert (args[ptr] is not None) is update, kernel


def test_adam_with_an_update_keeps_at_most_8_elements_per_thread():
    """Compiled for sm_90 (tests/gpu_ready/test_triton_aot.py), Adam recording its update
    spills at 16 elements per thread on unaligned float32 buffers: the pruning drops those
    configurations for it, and only for it (SGD and the no-update Adam keep them)."""
    from reptile_fused.backends.triton import kernels as K

    def kept(**named):
        named.setdefault("n_elements", 1 << 24)
        return {(c.kwargs["BLOCK"], c.num_warps) for c in K._prune_for_size(K._configs(), named)}

    f32 = torch.empty(0)
    every = {(c.kwargs["BLOCK"], c.num_warps) for c in K._configs()}
    per_thread = {c: c[0] // (32 * c[1]) for c in every}
    adam = dict(param_ptr=f32, grad_ptr=f32, exp_avg_ptr=f32)
    assert kept(**adam, update_ptr=None) == every
    with_update = kept(**adam, update_ptr=f32)
    assert with_update and all(per_thread[c] <= 8 for c in with_update)
    assert kept(param_ptr=f32, grad_ptr=f32, buf_ptr=f32, update_ptr=f32) == every


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
def test_update_is_the_stored_value_minus_the_old_one(dtype):
    """For 16-bit parameters the update is taken from the value as stored (rounded to
    nearest even, overflow to inf, NaN kept), not from the float32 value before
    rounding: checked bit for bit on steps that land on rounding ties, past the largest
    finite value and on NaN (bfloat16 runs the bit-manipulated rounding under the interpreter)."""
    finfo = torch.finfo(dtype)
    ulp_at_one = 2.0 ** -(10 if dtype == torch.float16 else 7)
    old = torch.tensor([1.0, 1.0, 1.0 + ulp_at_one, finfo.max, -finfo.max, float("nan"), 0.0, 3.0], dtype=dtype)
    # Steps (lr 1, grad = -step): a tie to even each way, past the largest finite each
    # way, NaN in, a subnormal, and an ordinary one.
    steps = [ulp_at_one / 2, ulp_at_one * 1.5, ulp_at_one / 2, finfo.max / 2**(3 if dtype == torch.float16 else 7),
             -finfo.max / 2**(3 if dtype == torch.float16 else 7), 1.0, finfo.tiny / 4, -0.3]  # fmt: skip
    grad = -torch.tensor(steps, dtype=torch.float32).to(dtype)
    param, update = old.clone(), torch.full((8,), 123.0)
    T.sgd_step_(param, grad, None, 1.0, update=update)
    stored = param.float()
    expected = stored - old.float()
    assert torch.equal(update.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(update[ok], expected[ok])
    assert param[3].isinf() and param[4].isinf(), "the steps past the largest finite value must overflow"
    ref_param, ref_update = old.clone(), torch.zeros(8)
    from reptile_fused import reference as R

    R.sgd_step_(ref_param, grad, None, 1.0, update=ref_update)
    # (NaN payloads may differ; NaNs in the same places are what counts.)
    assert torch.equal(param.isnan(), ref_param.isnan()) and torch.equal(update.isnan(), ref_update.isnan())
    ok = ~param.isnan()
    assert torch.equal(param[ok].view(torch.int16), ref_param[ok].view(torch.int16))
    assert torch.equal(update[ok], ref_update[ok])
