"""batched_meta_update_: ``theta <- theta + meta_lr * (mean of the task rows - theta)``,
optionally written back into every row (with per-task updates, first-order MAML: row i
counts as theta + updates[i], the rows unread); the reference against the formula, and every
backend against the reference (every dtype, awkward sizes, rows and alignments, meta_lr
as a number or a tensor, property-based cases, bad input)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from ops.cases import (
    DTYPES, backend_module, bad_input_test, dtype_id, large_test, opmath, property_cases, refused, run_batched,
    scalars_test, sizes, targets, unaligned_test, z,
)
from reptile_fused import reference as ref
from reptile_fused.backends import available_backends


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("write_back", [True, False])
def test_reference_is_the_formula(dtype, n, write_back):
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(37, generator=g).to(dtype)
    tasks = torch.randn(n, 37, generator=g).to(dtype)
    before = tasks.clone()
    opm = opmath(dtype)
    mean = before.to(opm).sum(0) / n
    t = theta.to(opm)
    expected = (t + 0.25 * (mean - t)).to(dtype)
    ref.batched_meta_update_(theta, tasks, 0.25, write_back=write_back)
    torch.testing.assert_close(theta, expected, rtol=0, atol=0) if n == 1 else torch.testing.assert_close(theta, expected)
    if write_back:
        assert torch.equal(tasks, theta.expand(n, -1))
    else:
        assert torch.equal(tasks, before)


# (rows, write_back, how meta_lr is given)
ROWS = [(5, True, "python"), (1, True, "python"), (5, False, "dev-f32"), (1, False, "dev-f32")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_sizes(device, backend, size, dtype):
    for rows, write_back, kind in ROWS:
        run_batched(backend, device, size, dtype, rows=rows, write_back=write_back, kind=kind)


test_unaligned = unaligned_test("batched_meta_update_", also=[(1025, dict(rows=3, meta_lr=0.3))])
test_large = large_test("batched_meta_update_", rows=2)  # rows are covered below; size is the point here


# (size, offset) for every row count; Triton's interpreter gets the smaller sizes.
ROW_SIZES = {
    "default": ((1, 0), (17, 0), (4099, 0), (4099, 1), (1024, 3)),
    "triton": ((1, 0), (17, 0), (1025, 0), (1025, 1), (1024, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("write_back", [True, False])
@pytest.mark.parametrize(("device", "backend"), targets())
def test_rows(device, backend, rows, write_back, dtype):
    for size, offset in sizes(backend, ROW_SIZES):
        run_batched(backend, device, size, dtype, rows=rows, offset=offset, write_back=write_back, seed=size)


test_scalars_as_tensors = scalars_test("batched_meta_update_", meta_lr=0.375)


@property_cases(
    rows=st.integers(1, 16),
    meta_lr=st.floats(0.0, 1.0),
    write_back=st.booleans(),
)
def test_property(backend, size, offset, dtype, rows, meta_lr, write_back, seed):
    run_batched(backend, "cpu", size, dtype, rows=rows, offset=offset, seed=seed, meta_lr=meta_lr,
                write_back=write_back)


# --------------------------------------------------------------------- bad input


def _shape(ops, device):
    theta, tasks = torch.randn(8, device=device), torch.randn(3, 7, device=device)
    return (lambda: ops.batched_meta_update_(theta, tasks, 0.5)), [theta, tasks]


def _empty(ops, device):
    theta, tasks = torch.randn(8, device=device), torch.randn(0, 8, device=device)
    return (lambda: ops.batched_meta_update_(theta, tasks, 0.5)), [theta]


def _dtype(ops, device):
    theta, tasks = torch.randn(8, device=device), torch.randn(2, 8, device=device, dtype=torch.float64)
    return (lambda: ops.batched_meta_update_(theta, tasks, 0.5)), [theta, tasks]


BAD = {
    "tasks 0 rows": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(0, 8, device=d), 0.5)),
    "tasks wrong P": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 9, device=d), 0.5)),
    "tasks 1-D": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), z(16, device=d), 0.5)),
    "tasks dtype": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, dtype=torch.float64, device=d), 0.5)),
    "shape, watched": _shape,
    "empty, watched": _empty,
    "dtype, watched": _dtype,
}  # fmt: skip

test_bad_input_rejected_like_reference = bad_input_test(BAD)


@pytest.mark.parametrize(("device", "backend"), targets())
def test_nothing_half_applied(device, backend):
    theta, tasks = torch.ones(8, device=device), torch.full((2, 9), 3.0, device=device)
    with pytest.raises(ValueError):
        backend_module(backend, device).batched_meta_update_(theta, tasks, 0.5)
    assert torch.equal(theta, torch.ones(8, device=device))
    assert torch.equal(tasks, torch.full((2, 9), 3.0, device=device))


@pytest.mark.parametrize(("device", "backend"), targets(only=("cpp", "triton")))
def test_meta_lr_on_another_device_rejected(device, backend):
    # The reference reads tensor scalars with .item(); a kernel that reads the scalar on
    # the device needs it on the buffers' device or the CPU.
    z8 = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="meta_lr is on meta"):
        backend_module(backend, device).batched_meta_update_(z8, torch.zeros(2, 8, device=device),
                                                             torch.tensor(0.5, device="meta"))


# --------------------------------------------------------------------- first-order MAML: theta + updates[i]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_updates_sizes(device, backend, size, dtype):
    for rows, write_back, kind in ROWS:
        run_batched(backend, device, size, dtype, rows=rows, write_back=write_back, kind=kind, updates=True)


test_updates_unaligned = unaligned_test("batched_meta_update_", also=[(1025, dict(rows=3, write_back=False))],
                                        updates=True)
test_updates_large = large_test("batched_meta_update_", rows=2, updates=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize(("device", "backend"), targets())
def test_updates_rows(device, backend, rows, dtype):
    for size, offset in sizes(backend, ROW_SIZES):
        run_batched(backend, device, size, dtype, rows=rows, offset=offset, write_back=size % 2 == 1, seed=size,
                    updates=True)


@property_cases(rows=st.integers(1, 16), write_back=st.booleans())
def test_updates_property(backend, size, offset, dtype, rows, write_back, seed):
    run_batched(backend, "cpu", size, dtype, rows=rows, offset=offset, seed=seed, write_back=write_back,
                updates=True)


def _updates_shape(ops, device):
    theta, tasks = torch.randn(8, device=device), torch.randn(2, 8, device=device)
    return (lambda: ops.batched_meta_update_(theta, tasks, 0.5, updates=torch.zeros(3, 8, device=device))), [theta, tasks]


def _updates_dtype(ops, device):
    theta, tasks = torch.randn(8, device=device).half(), torch.randn(2, 8, device=device).half()
    ups = torch.zeros(2, 8, device=device).half()  # float16 parameters take float32 updates
    return (lambda: ops.batched_meta_update_(theta, tasks, 0.5, updates=ups)), [theta, tasks, ups]


BAD_UPDATES = {
    "updates float64 for float32": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, device=d), 0.5, updates=torch.zeros(2, 8, dtype=torch.float64, device=d))),
    "updates 1-D": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, device=d), 0.5, updates=z(16, device=d))),
    "updates wrong P": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, device=d), 0.5, updates=torch.zeros(2, 9, device=d))),
    "updates non-contiguous": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, device=d), 0.5, updates=torch.zeros(8, 2, device=d).t())),
    "updates on another device": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, device=d), 0.5, updates=torch.zeros(2, 8, device="meta"))),
    "updates int": refused(lambda m, d: lambda: m.batched_meta_update_(z(device=d), torch.zeros(2, 8, device=d), 0.5, updates=torch.zeros(2, 8, dtype=torch.int32, device=d))),
    "updates shape, watched": _updates_shape,
    "updates dtype, watched": _updates_dtype,
}  # fmt: skip

test_updates_bad_input_rejected_like_reference = bad_input_test(BAD_UPDATES)


EXACT_CPU = [b for b in ("reference", "cpp") if b in available_backends("cpu")]


@pytest.mark.skipif(len(EXACT_CPU) < 2, reason="the cpp extension is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("write_back", [True, False])
def test_cpu_backends_are_bit_equal(dtype, write_back):
    """cpp and the reference compute the same meta step on the CPU, bit for bit (the last
    multiply-add fused), also for meta_lr values that are not powers of two (issue 22)."""
    cpp = backend_module("cpp", "cpu")
    for size in (1, 17, 1023, 65537):
        for meta_lr in (0.7, 0.1, 1 / 3, 1.0):
            for rows in (1, 3, 5):
                gen = torch.Generator().manual_seed(size + rows)
                theta = torch.randn(size, generator=gen).to(dtype)
                tasks = torch.randn(rows, size, generator=gen).to(dtype)
                a, b = [(theta.clone(), tasks.clone()) for _ in range(2)]
                ref.batched_meta_update_(*a, meta_lr, write_back=write_back)
                cpp.batched_meta_update_(*b, meta_lr, write_back=write_back)
                assert torch.equal(a[0], b[0]), (size, meta_lr, rows)
                assert torch.equal(a[1], b[1])
