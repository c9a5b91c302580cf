"""task_end_: ``acc += param``, then ``param <- anchor``; with an update (first-order
MAML) ``acc += (anchor + update)`` instead, param unread.  Every backend against the
reference (exactly: one or two additions in the accumulator's dtype and a copy)."""

from __future__ import annotations

import pytest
import torch

from ops.cases import (
    DTYPES, bad_input_test, bufs, dtype_id, large_test, property_cases, refused, run_task_end, sizes, targets,
    unaligned_test, z,
)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_sizes(device, backend, size, dtype):
    run_task_end(backend, device, size, dtype)


# The same offset for every buffer, or a different one for each.
MIXED = {"param": 1, "anchor": 7, "acc": 3, "update": 5}
test_unaligned = unaligned_test("task_end_", offsets=(1, 3, MIXED), also=[(1025, dict(seed=1025))])
test_large = large_test("task_end_")


@property_cases()
def test_property(backend, size, offset, dtype, seed):
    run_task_end(backend, "cpu", size, dtype, offset=offset, seed=seed)


def _acc_dtype(ops, device):
    p, a, *_ = bufs(device, torch.float16)
    acc = torch.zeros(8, dtype=torch.float16, device=device)
    return (lambda: ops.task_end_(p, a, acc)), [p, acc]


def _acc_size(ops, device):
    p, a, *_ = bufs(device)
    acc = torch.zeros(9, device=device)
    return (lambda: ops.task_end_(p, a, acc)), [p, acc]


BAD = {
    "acc dtype": refused(lambda m, d: lambda: m.task_end_(z(dtype=torch.bfloat16, device=d), z(dtype=torch.bfloat16, device=d), z(dtype=torch.bfloat16, device=d))),
    "acc size": refused(lambda m, d: lambda: m.task_end_(z(device=d), z(device=d), z(9, device=d))),
    "acc dtype, watched": _acc_dtype,
    "acc size, watched": _acc_size,
}  # fmt: skip

test_bad_input_rejected_like_reference = bad_input_test(BAD)


# --------------------------------------------------------------------- first-order MAML: anchor + update


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("device", "backend", "size"), targets(per_backend=sizes))
def test_update_sizes(device, backend, size, dtype):
    run_task_end(backend, device, size, dtype, update=True)


test_update_unaligned = unaligned_test("task_end_", offsets=(1, 3, MIXED), update=True)
test_update_large = large_test("task_end_", update=True)


@property_cases()
def test_update_property(backend, size, offset, dtype, seed):
    run_task_end(backend, "cpu", size, dtype, offset=offset, seed=seed, update=True)


def _update_size(ops, device):
    p, a, *_ = bufs(device)
    acc = torch.zeros(8, device=device)
    return (lambda: ops.task_end_(p, a, acc, z(7, device=device))), [p, acc]


def _update_dtype(ops, device):
    p, a, *_ = bufs(device, torch.float16)
    acc = torch.zeros(8, device=device)
    return (lambda: ops.task_end_(p, a, acc, z(dtype=torch.float16, device=device))), [p, acc]


def _update_is_param(ops, device):
    p, a, *_ = bufs(device)
    acc = torch.zeros(8, device=device)
    return (lambda: ops.task_end_(p, a, acc, p)), [p, acc]


BAD_UPDATE = {
    "update float64 for float32": refused(lambda m, d: lambda: m.task_end_(z(device=d), z(device=d), z(device=d), z(dtype=torch.float64, device=d))),
    "update size": refused(lambda m, d: lambda: m.task_end_(z(device=d), z(device=d), z(device=d), z(9, device=d))),
    "update non-contiguous": refused(lambda m, d: lambda: m.task_end_(z(device=d), z(device=d), z(device=d), torch.zeros(16, device=d)[::2])),
    "update on another device": refused(lambda m, d: lambda: m.task_end_(z(device=d), z(device=d), z(device=d), z(device="meta"))),
    "update size, watched": _update_size,
    "update dtype, watched": _update_dtype,
    "update is param, watched": _update_is_param,
}  # fmt: skip

test_update_bad_input_rejected_like_reference = bad_input_test(BAD_UPDATE)
