"""The reference itself against the formulas of the numerics contract: 16-bit buffers
are float32 math rounded once, task_end_/meta_update_ compute Reptile's mean, tensor
scalars equal number scalars, empty buffers are fine, and bad input is refused (with
the messages every backend must repeat: the ``bad input`` tests of each op)."""

import pytest
import torch

from numerics import opmath
from reptile_fused import reference as ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_is_fp32_math_rounded_once(dtype):
    g = torch.Generator().manual_seed(3)
    p16 = torch.randn(101, generator=g).to(dtype)
    g16 = torch.randn(101, generator=g).to(dtype)
    b16 = torch.randn(101, generator=g).to(dtype)
    p32, g32, b32 = p16.float(), g16.float(), b16.float()
    ref.sgd_step_(p16, g16, b16, 0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    ref.sgd_step_(p32, g32, b32, 0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    assert torch.equal(p16, p32.to(dtype))
    assert torch.equal(b16, b32.to(dtype))

    m16, v16 = torch.rand(101, generator=g).to(dtype), torch.rand(101, generator=g).to(dtype)
    p32, m32, v32 = p16.float(), m16.float(), v16.float()
    ref.adam_step_(p16, g16, m16, v16, None, 3, 0.01, beta1=0.9)
    ref.adam_step_(p32, g32, m32, v32, None, 3, 0.01, beta1=0.9)
    assert torch.equal(p16, p32.to(dtype))
    assert torch.equal(v16, v32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_task_end_and_meta_update(dtype):
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(50, generator=g).to(dtype)
    anchor = theta.clone()
    acc_dtype = opmath(dtype)
    acc = torch.zeros(50, dtype=acc_dtype)
    adapted = [torch.randn(50, generator=g).to(dtype) for _ in range(3)]
    for a in adapted:
        theta.copy_(a)
        ref.task_end_(theta, anchor, acc)
        assert torch.equal(theta, anchor)
    expected_mean = sum(a.to(acc_dtype) for a in adapted) / 3
    ref.meta_update_(theta, anchor, acc, 0.5, 3)
    a = anchor.to(acc_dtype)
    assert torch.equal(theta, (a + 0.5 * (expected_mean - a)).to(dtype))
    assert not acc.any()


def test_tensor_scalars_equal_number_scalars():
    g = torch.Generator().manual_seed(6)
    p1 = torch.randn(20, generator=g)
    grad = torch.randn(20, generator=g)
    p2 = p1.clone()
    m1, v1, m2, v2 = (torch.zeros(20) for _ in range(4))
    ref.adam_step_(p1, grad, m1, v1, None, 2, 0.01)
    ref.adam_step_(p2, grad, m2, v2, None, torch.tensor(2.0), torch.tensor(0.01))
    assert torch.equal(p1, p2)
    acc1 = torch.randn(20, generator=g)
    acc2 = acc1.clone()
    ref.meta_update_(p1, p2.clone(), acc1, 0.3, 4)
    ref.meta_update_(p2, p2.clone(), acc2, torch.tensor(0.3), torch.tensor(4.0))
    assert torch.equal(p1, p2)


def test_empty_buffers_are_fine():
    e = torch.empty(0)
    ref.sgd_step_(e, e.clone(), e.clone(), 0.1, momentum=0.9)
    ref.adam_step_(e, e.clone(), e.clone(), e.clone(), None, 1, 0.1)
    ref.task_end_(e, e.clone(), e.clone())
    ref.meta_update_(e, e.clone(), e.clone(), 1.0, 1)
    ref.batched_meta_update_(e, torch.empty(3, 0), 1.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ref.sgd_step_(torch.zeros(4), torch.zeros(5), None, 0.1), "shape"),
        (lambda: ref.sgd_step_(torch.zeros(4), torch.zeros(4, dtype=torch.float64), None, 0.1), "dtype"),
        (lambda: ref.sgd_step_(torch.zeros(4, 2), torch.zeros(4, 2), None, 0.1), "1-D"),
        (lambda: ref.sgd_step_(torch.zeros(8)[::2], torch.zeros(4), None, 0.1), "contiguous"),
        (lambda: ref.sgd_step_(torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), None, 1), "dtype"),
        (lambda: ref.sgd_step_(torch.zeros(4), torch.zeros(4), None, 0.1, momentum=0.9), "momentum_buffer"),
        (lambda: ref.adam_step_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), None, 0, 0.1), "step"),
        (lambda: ref.task_end_(torch.zeros(4, dtype=torch.half), torch.zeros(4, dtype=torch.half), torch.zeros(4, dtype=torch.half)), "float32"),
        (lambda: ref.meta_update_(torch.zeros(4), torch.zeros(4), torch.zeros(4), 1.0, 0), "n"),
        (lambda: ref.batched_meta_update_(torch.zeros(4), torch.zeros(0, 4), 1.0), "at least one"),
        (lambda: ref.batched_meta_update_(torch.zeros(4), torch.zeros(2, 5), 1.0), r"\[n, P\]"),
    ],
)
def test_bad_input_is_rejected_before_anything_changes(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
