"""The reference ops against torch.optim and against the formulas they stand for."""

import itertools

import pytest
import torch

from reptile_fused import reference as ref

SHAPES = [(7, 3), (5,), (2, 3, 4), (1,), (33,)]


def _flat_problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(12)]
    return params, grads


def _cat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


SGD_OPTIONS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 0.01], [False, True], [False, True])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=str)
def test_sgd_step_matches_torch_sgd(dtype, opts):
    params, grads = _flat_problem(dtype)
    theirs = [p.clone().requires_grad_() for p in params]
    torch_opt = torch.optim.SGD(theirs, lr=0.05, foreach=False, **opts)
    flat = _cat(params)
    buf = torch.zeros_like(flat) if opts["momentum"] else None
    for k, gs in enumerate(grads):
        for p, g in zip(theirs, gs):
            p.grad = g.clone()
        torch_opt.step()
        ref.sgd_step_(flat, _cat(gs), buf, 0.05, first_step=(k == 0), **opts)
    assert torch.equal(flat, _cat([p.detach() for p in theirs]))
    if buf is not None:
        assert torch.equal(buf, _cat([torch_opt.state[p]["momentum_buffer"] for p in theirs]))


ADAM_OPTIONS = [
    dict(betas=b, weight_decay=wd, amsgrad=a, maximize=mx)
    for b, wd, a, mx in itertools.product([(0.9, 0.999), (0.0, 0.999)], [0.0, 0.01], [False, True], [False, True])
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", ADAM_OPTIONS, ids=str)
def test_adam_step_matches_torch_adam(dtype, opts):
    params, grads = _flat_problem(dtype, seed=1)
    theirs = [p.clone().requires_grad_() for p in params]
    torch_opt = torch.optim.Adam(theirs, lr=0.01, eps=1e-6, foreach=False, **opts)
    flat = _cat(params)
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    vmax = torch.zeros_like(flat) if opts["amsgrad"] else None
    beta1, beta2 = opts["betas"]
    for k, gs in enumerate(grads):
        for p, g in zip(theirs, gs):
            p.grad = g.clone()
        torch_opt.step()
        ref.adam_step_(
            flat, _cat(gs), m, v, vmax, k + 1, 0.01, beta1=beta1, beta2=beta2, eps=1e-6,
            weight_decay=opts["weight_decay"], amsgrad=opts["amsgrad"], maximize=opts["maximize"],
        )
    assert torch.equal(flat, _cat([p.detach() for p in theirs]))
    assert torch.equal(v, _cat([torch_opt.state[p]["exp_avg_sq"] for p in theirs]))


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
    acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("write_back", [True, False])
def test_batched_meta_update(dtype, n, write_back):
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(37, generator=g).to(dtype)
    tasks = torch.randn(n, 37, generator=g).to(dtype)
    before = tasks.clone()
    opm = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    mean = before.to(opm).sum(0) / n
    t = theta.to(opm)
    expected = (t + 0.25 * (mean - t)).to(dtype)
    ref.batched_meta_update_(theta, tasks, 0.25, write_back=write_back)
    torch.testing.assert_close(theta, expected, rtol=0, atol=0) if n == 1 else torch.testing.assert_close(theta, expected)
    if write_back:
        assert torch.equal(tasks, theta.expand(n, -1))
    else:
        assert torch.equal(tasks, before)


def test_tensor_scalars_equal_number_scalars():
    g = torch.Generator().manual_seed(6)
    p1 = torch.randn(20, generator=g)
    grad = torch.randn(20, generator=g)
    p2 = p1.clone()
    m1, v1, m2, v2 = (torch.zeros(20) for _ in range(4))
    ref.adam_step_(p1, grad, m1, v1, None, 2, 0.01)
    ref.adam_step_(p2, grad, m2, v2, None, torch.tensor(2.0), torch.tensor(0.01))
    assert torch.equal(p1, p2)
    acc1, acc2 = torch.randn(20, generator=g), None
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
