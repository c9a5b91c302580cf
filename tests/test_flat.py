"""Flat buffers: layout, views, gradient handling and segment planning."""

import pytest
import torch

from reptile_fused.flat import ALIGNMENT, FlatBuffer, Segment


def params(*shapes, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_layout_is_aligned_and_values_preserved(dtype):
    ps = params((3, 5), (1,), (17,), (2, 2, 2), dtype=dtype)
    before = [p.detach().clone() for p in ps]
    buf = FlatBuffer(ps)
    assert all(off % ALIGNMENT == 0 for off in buf.offsets)
    assert buf.numel % ALIGNMENT == 0
    for p, b, off in zip(ps, before, buf.offsets):
        assert torch.equal(p, b)
        assert p.data_ptr() == buf.data.data_ptr() + off * buf.data.element_size()
        assert p.grad.data_ptr() == buf.grad.data_ptr() + off * buf.grad.element_size()
    # Padding is zero, so kernels may run over it.
    mask = torch.ones(buf.numel, dtype=torch.bool)
    for off, n in zip(buf.offsets, buf.numels):
        mask[off : off + n] = False
    assert not buf.data[mask].any() and not buf.grad[mask].any()


def test_existing_gradients_are_kept():
    ps = params((4,), (3,))
    ps[0].grad = torch.ones(4)
    buf = FlatBuffer(ps)
    assert torch.equal(ps[0].grad, torch.ones(4))
    assert torch.equal(ps[1].grad, torch.zeros(3))
    assert buf.grad[:4].sum() == 4


def test_autograd_accumulates_into_the_flat_gradient():
    ps = params((4,), (3,))
    buf = FlatBuffer(ps)
    (ps[0].sum() * 2 + ps[1].sum()).backward()
    (ps[0].sum()).backward()
    assert torch.equal(buf.grad[:4], torch.full((4,), 3.0))
    assert torch.equal(buf.grad[16:19], torch.ones(3))


def test_foreign_gradients_are_adopted():
    ps = params((4,), (3,))
    buf = FlatBuffer(ps)
    buf.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ps)
    ps[1].sum().backward()
    active, foreign = buf.pending_grads()
    assert active == [False, True]
    assert [i for i, _ in foreign] == [1]
    buf.adopt_grads(foreign)
    assert ps[1].grad.data_ptr() == buf.grad.data_ptr() + 16 * 4
    assert torch.equal(buf.grad[16:19], torch.ones(3))


def test_segments():
    buf = FlatBuffer(params((4,), (20,), (3,), (1,)))
    assert buf.segments([1, 1, 1, 1]) == [(1, Segment(0, 3, 0, buf.numel))]
    assert buf.segments([None, 1, 1, None]) == [(1, Segment(1, 2, 16, 64))]
    assert buf.segments([1, 2, 2, 1]) == [(1, Segment(0, 0, 0, 16)), (2, Segment(1, 2, 16, 64)), (1, Segment(3, 3, 64, 80))]
    assert buf.segments([None, None, None, None]) == []


def test_mixed_devices_or_dtypes_are_rejected():
    with pytest.raises(ValueError, match="one device and dtype"):
        FlatBuffer([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)])
