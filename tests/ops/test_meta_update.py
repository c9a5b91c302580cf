"""meta_update_: ``param <- anchor + meta_lr * (acc / n - anchor)``, then ``acc <- 0``;
every backend against the reference (every dtype, awkward sizes and alignments, n and
meta_lr as numbers or tensors, 16-bit rounding, bad input)."""

from __future__ import annotations

import pytest
import torch

from ops.cases import (
    DTYPES, backend_module, bad_input_test, bufs, dtype_id, large_test, opmath, property_cases, refused,
    run_meta_update, scalars_test, sizes, targets, unaligned_test, z,
)
from reptile_fused import reference as ref
from reptile_fused.backends import available_backends

# (tasks, how meta_lr and n are given)
TASKS = [(3, "python"), (1, "python"), (5, "python"), (5, "dev-f32"), (1, "dev-f32")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_sizes(device, backend, size, dtype):
    for tasks, kind in TASKS:
        run_meta_update(backend, device, size, dtype, tasks=tasks, kind=kind)


# The same offset for every buffer, or a different one for each.
MIXED = {"param": 1, "anchor": 7, "acc": 3}
test_unaligned = unaligned_test("meta_update_", offsets=(1, 3, MIXED), also=[(1025, dict(meta_lr=0.5))])
test_large = large_test("meta_update_")


test_scalars_as_tensors = scalars_test("meta_update_", meta_lr=0.5, tasks=3)  # meta_lr and n


@property_cases()
def test_property(backend, size, offset, dtype, seed):
    run_meta_update(backend, "cpu", size, dtype, offset=offset, seed=seed)


@pytest.mark.parametrize(("device", "backend"), targets())
def test_float64_meta_lr_is_not_rounded_to_float32(device, backend):
    """Triton passes float arguments as float32; float64 buffers must see the float64 value."""
    param = torch.zeros(3, dtype=torch.float64, device=device)
    anchor = torch.ones(3, dtype=torch.float64, device=device)
    acc = torch.full((3,), 6.0, dtype=torch.float64, device=device)
    backend_module(backend, device).meta_update_(param, anchor, acc, 1 / 3, 3)
    assert torch.equal(param, torch.full_like(param, 1 + (1 / 3) * (6.0 / 3 - 1)))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 overflow to inf
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_16bit_store_rounds_to_nearest_even(device, backend, dtype):
    """meta_update_ with meta_lr = 1, n = 1 stores acc itself: the result must be acc rounded to nearest even."""
    gen = torch.Generator().manual_seed(6)
    acc = torch.randn(1025, generator=gen).to(device)
    acc[:4] = torch.tensor([float("inf"), -float("inf"), 3.4e38, 1e-40])
    anchor = torch.zeros(1025, dtype=dtype, device=device)
    param = torch.empty_like(anchor)
    backend_module(backend, device).meta_update_(param, anchor, acc.clone(), 1.0, 1)
    assert torch.equal(param, acc.to(dtype))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's numpy
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
@pytest.mark.parametrize(("device", "backend"), targets())
def test_16bit_values_round_trip(device, backend, dtype):
    """meta_update_ with meta_lr = 0 rewrites the anchor's own values: every one, subnormals and infinities
    included, must survive the widening load and the rounding store unchanged."""
    finfo = torch.finfo(dtype)
    special = [0.0, -0.0, finfo.tiny, finfo.tiny / 8, -finfo.tiny / 2, finfo.max, -finfo.max, float("inf"), -float("inf")]
    anchor = torch.cat([torch.tensor(special), torch.randn(32)]).to(device=device, dtype=dtype)
    param = torch.empty_like(anchor)
    acc = torch.zeros(anchor.numel(), device=device)
    backend_module(backend, device).meta_update_(param, anchor, acc, 0.0, 1)
    finite = anchor.isfinite()
    assert torch.equal(param[finite], anchor[finite])
    # inf + 0 * (0 - inf) is NaN in the reference too.
    assert param[~finite].isnan().all()


def _n0(ops, device):
    p, a, acc, *_ = bufs(device)
    return (lambda: ops.meta_update_(p, a, acc, 0.5, 0)), [p, acc]


def _anchor_dtype(ops, device):
    p, a, acc, *_ = bufs(device)
    return (lambda: ops.meta_update_(p, a.double(), acc, 0.5, 2)), [p, acc]


BAD = {
    "n 0": refused(lambda m, d: lambda: m.meta_update_(z(device=d), z(device=d), z(device=d), 1.0, 0)),
    "n tensor -1": refused(lambda m, d: lambda: m.meta_update_(z(device=d), z(device=d), z(device=d), 1.0, torch.tensor(-1.0))),
    "n 0, watched": _n0,
    "anchor dtype": _anchor_dtype,
}  # fmt: skip

test_bad_input_rejected_like_reference = bad_input_test(BAD)


EXACT_CPU = [b for b in ("reference", "cpp") if b in available_backends("cpu")]


@pytest.mark.skipif(len(EXACT_CPU) < 2, reason="the cpp extension is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_backends_are_bit_equal(dtype):
    """One numerics for the meta step on the CPU: cpp and the reference both compute
    anchor + meta_lr * (acc / n - anchor) with the last multiply-add fused, so a run
    resumed on the other backend continues bit for bit.  meta_lr values that are not
    powers of two are where an unfused product would differ (issue 22)."""
    cpp = backend_module("cpp", "cpu")
    for size in (1, 17, 1023, 65537):
        for meta_lr in (0.7, 0.1, 1 / 3, 0.5, 1.0):
            for tasks in (1, 3, 5):
                for kind in ("python", "tensor"):
                    gen = torch.Generator().manual_seed(size + tasks)
                    param = torch.randn(size, generator=gen).to(dtype)
                    anchor = torch.randn(size, generator=gen).to(dtype)
                    acc = (torch.randn(size, generator=gen) * tasks).to(opmath(dtype))
                    lr = torch.tensor(meta_lr) if kind == "tensor" else meta_lr
                    n = torch.tensor(float(tasks)) if kind == "tensor" else tasks
                    a, b = [(param.clone(), anchor.clone(), acc.clone()) for _ in range(2)]
                    ref.meta_update_(*a, lr, n)
                    cpp.meta_update_(*b, lr, n)
                    assert torch.equal(a[0], b[0]), (size, meta_lr, tasks, kind)
                    assert torch.equal(a[2], b[2])
