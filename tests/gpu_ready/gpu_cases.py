"""Self-contained helpers of the GPU twin tests: inputs, the numerics contract, and one
runner per op that runs a backend and the reference on copies and compares them.

Kept apart from the other test helpers on purpose: the tests here must keep running
wherever the rest of tests/ moves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reptile_fused import get_backend
from reptile_fused import reference as R

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def flat(size, dtype, device, *, seed=0, offset=0, positive=False, scale=1.0) -> Tensor:
    """A 1-D buffer; with ``offset`` a view ``offset`` elements into a larger allocation
    (an odd offset breaks 16-byte alignment the way a flat-buffer slice does)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(size + offset, generator=gen, dtype=torch.float32) * scale
    if positive:
        values = values.abs()
    return values.to(device=device, dtype=dtype)[offset:]


def clone_in_place(t):
    """A copy with the same storage offset and strides (``clone()`` would re-align a view)."""
    if t is None:
        return None
    base = torch.empty(t.storage_offset() + t.numel(), dtype=t.dtype, device=t.device)
    return base.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def clones(*ts):
    return [clone_in_place(t) for t in ts]


def scalar(value: float, kind: str, device):
    if kind == "python":
        return value
    if kind == "tensor":
        return torch.tensor(float(value), device=device)
    if kind == "tensor64":
        return torch.tensor(float(value), device=device, dtype=torch.float64)
    raise ValueError(kind)


def _spacing(x: Tensor, dtype: torch.dtype) -> Tensor:
    bits = MANTISSA_BITS[dtype]
    exponent = torch.frexp(x.double().abs()).exponent
    gap = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - bits)
    return gap.clamp_min(torch.finfo(dtype).smallest_normal * 2.0**-bits)


def assert_ulp_close(out: Tensor, ref: Tensor, *, ulps: float, atol: float = 0.0, what: str = "") -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, ref.dtype, out.shape, ref.shape)
    o, r = out.double(), ref.double()
    nan_o, nan_r = o.isnan(), r.isnan()
    assert torch.equal(nan_o, nan_r), f"{what}: NaNs differ"
    o, r = o[~nan_o], r[~nan_r]
    same_inf = (o == r) & o.isinf()
    tol = ulps * torch.maximum(_spacing(o, out.dtype), _spacing(r, out.dtype)) + atol
    bad = ~same_inf & ~((o - r).abs() <= tol)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off by more than {ulps} ulp (+{atol}); "
            f"first at {i}: got {o[i].item()!r}, expected {r[i].item()!r}"
        )


def assert_contract(out: Tensor, ref: Tensor, what: str = "") -> None:
    """16-bit: within 1 ulp and almost always bit-equal; float32/64: to rounding."""
    if out.dtype in (torch.float16, torch.bfloat16):
        assert_ulp_close(out, ref, ulps=1, atol=1e-6, what=what)
        if out.numel() >= 16:
            exact = (out.double() == ref.double()) | (out.isnan() & ref.isnan())
            assert exact.float().mean().item() >= 0.98, f"{what}: too few bit-equal elements"
    else:
        eps = torch.finfo(out.dtype).eps
        assert_ulp_close(out, ref, ulps=4, atol=8 * eps, what=what)


def check_all(outs, refs, names, what=""):
    for out, ref, name in zip(outs, refs, names):
        if ref is not None:
            assert_contract(out, ref, f"{what} {name}")


# ------------------------------------------------------------------ per-op runners

SGD_VARIANTS = {
    "plain": dict(momentum=0.0),
    "momentum-first": dict(momentum=0.9, first_step=True),
    "momentum": dict(momentum=0.9, dampening=0.1),
    "nesterov-wd": dict(momentum=0.9, weight_decay=0.01, nesterov=True),
    "maximize-wd": dict(momentum=0.5, weight_decay=0.1, maximize=True),
}
ADAM_VARIANTS = {
    "plain": dict(),
    "amsgrad-wd": dict(amsgrad=True, weight_decay=0.01),
    "maximize-beta1-0": dict(maximize=True, beta1=0.0, beta2=0.99),
}


def run_sgd(backend, size, dtype, device, variant="momentum", lr_kind="python", offset=0, seed=0):
    kw = SGD_VARIANTS[variant]
    B = get_backend(backend, device)
    param = flat(size, dtype, device, seed=seed, offset=offset)
    grad = flat(size, dtype, device, seed=seed + 1, offset=offset)
    buf = flat(size, dtype, device, seed=seed + 2, offset=offset) if kw["momentum"] != 0 else None
    ref, out = clones(param, grad, buf), clones(param, grad, buf)
    R.sgd_step_(*ref, scalar(0.1, lr_kind, device), **kw)
    B.sgd_step_(*out, scalar(0.1, lr_kind, device), **kw)
    check_all(out, ref, ("param", "grad", "momentum_buffer"), f"{backend} sgd {variant}")


def run_adam(backend, size, dtype, device, variant="amsgrad-wd", step=3, step_kind="python", lr_kind="python",
             offset=0, seed=0):  # fmt: skip
    kw = ADAM_VARIANTS[variant]
    B = get_backend(backend, device)
    param = flat(size, dtype, device, seed=seed, offset=offset)
    grad = flat(size, dtype, device, seed=seed + 1, offset=offset)
    m = flat(size, dtype, device, seed=seed + 2, offset=offset, scale=0.1)
    v = flat(size, dtype, device, seed=seed + 3, offset=offset, positive=True)
    vmax = flat(size, dtype, device, seed=seed + 4, offset=offset, positive=True) if kw.get("amsgrad") else None
    ref, out = clones(param, grad, m, v, vmax), clones(param, grad, m, v, vmax)
    args = (scalar(step, step_kind, device), scalar(1e-2, lr_kind, device))
    R.adam_step_(*ref, *args, **kw)
    B.adam_step_(*out, *args, **kw)
    check_all(out, ref, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), f"{backend} adam {variant}")


def run_task_end_and_meta_update(backend, size, dtype, device, kind="python", offset=0, seed=0, n=3):
    B = get_backend(backend, device)
    param = flat(size, dtype, device, seed=seed, offset=offset)
    anchor = flat(size, dtype, device, seed=seed + 1, offset=offset + 2 if offset else 0)
    acc = flat(size, opmath(dtype), device, seed=seed + 2, offset=offset, scale=3.0)
    ref, out = clones(param, anchor, acc), clones(param, anchor, acc)
    R.task_end_(*ref)
    B.task_end_(*out)
    for o, r, name in zip(out, ref, ("param", "anchor", "acc")):
        assert torch.equal(o, r), f"{backend} task_end_ {name}"
    R.meta_update_(*ref, scalar(0.5, kind, device), scalar(n, kind, device))
    B.meta_update_(*out, scalar(0.5, kind, device), scalar(n, kind, device))
    check_all(out, ref, ("param", "anchor", "acc"), f"{backend} meta_update_")
    assert not out[2].any(), "meta_update_ must zero the accumulator"


def run_batched(backend, size, dtype, device, rows=5, write_back=True, kind="python", offset=0, seed=0):
    B = get_backend(backend, device)
    theta = flat(size, dtype, device, seed=seed, offset=offset)
    tasks = flat(rows * size, dtype, device, seed=seed + 1, offset=offset).view(rows, size)
    ref, out = clones(theta, tasks), clones(theta, tasks)
    R.batched_meta_update_(*ref, scalar(0.3, kind, device), write_back=write_back)
    B.batched_meta_update_(*out, scalar(0.3, kind, device), write_back=write_back)
    assert_contract(out[0], ref[0], f"{backend} batched theta")
    if write_back:
        assert torch.equal(out[1], out[0].expand_as(out[1])), "every row must hold the new theta"
    else:
        assert torch.equal(out[1], tasks), "tasks must be untouched without write_back"


def run_all_ops(backend, size, dtype, device, offset=0, seed=0):
    run_sgd(backend, size, dtype, device, "nesterov-wd", "tensor", offset=offset, seed=seed)
    run_adam(backend, size, dtype, device, "amsgrad-wd", 2, "tensor", "python", offset=offset, seed=seed)
    run_task_end_and_meta_update(backend, size, dtype, device, "tensor", offset=offset, seed=seed)
    run_batched(backend, size, dtype, device, offset=offset, seed=seed)
