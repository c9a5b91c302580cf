"""Shared helpers for the C++/CUDA backend tests: input builders, one runner per op
that applies the reference and the cpp backend to identical copies, and the
tolerance the numerics contract allows."""

from __future__ import annotations

import torch

from reptile_fused import reference as ref
from reptile_fused.backends import cpp

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SIZES = (0, 1, 3, 4, 17, 1023, 65537)
LARGE = 3_000_001
from reptile_fused.backends.op_table import OP_NAMES as OPS


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def buffer(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` copied into a bigger allocation starting ``offset`` elements in, so an
    odd offset breaks 16-byte alignment the way a flat-buffer slice does."""
    base = torch.empty(values.numel() + offset + 1, dtype=values.dtype, device=values.device)
    view = base[offset : offset + values.numel()]
    view.copy_(values.reshape(-1))
    return view


def randn(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, offset: int = 0, scale: float = 1.0):
    return buffer((torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device), offset)


def rand(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, offset: int = 0):
    return buffer(torch.rand(n, generator=gen, dtype=torch.float64).to(dtype).to(device), offset)


def twins(tensors: dict[str, torch.Tensor | None], offset: int):
    """Two independent copies of the inputs (each at ``offset``) for the two backends."""

    def copy(t):
        return None if t is None else buffer(t.clone(), offset)

    return {k: copy(t) for k, t in tensors.items()}, {k: copy(t) for k, t in tensors.items()}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """fp32/fp64: equal to rounding (a few ulp of O(1) data).  fp16/bf16: within one
    ulp of the storage dtype of the reference's own fp32-opmath result, plus an fp32
    rounding slack for values that cancel to near zero."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if actual.numel() == 0:
        return
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert torch.isnan(a).equal(torch.isnan(e)), f"{name}: NaN pattern differs"
    a, e = a.nan_to_num(), e.nan_to_num()
    info = torch.finfo(actual.dtype)
    if actual.dtype in (torch.float32, torch.float64):
        tol = 4 * info.eps * (1 + e.abs())
    else:
        exponent = torch.floor(torch.log2(e.abs().clamp_min(info.tiny)))
        ulp = torch.exp2(exponent) * info.eps
        tol = ulp + 2e-6
    err = (a - e).abs()
    bad = err > tol
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name} ({actual.dtype}, {int(bad.sum())} of {a.numel()} off): at {i} got {a[i].item()!r}, "
            f"expected {e[i].item()!r}, tolerance {tol[i].item():.3g}"
        )


def assert_all(got: dict, want: dict, names) -> None:
    for k in names:
        if got[k] is not None:
            assert_matches(got[k], want[k], k)


# --------------------------------------------------------------------- per-op runners
# Each builds inputs, runs both backends on copies, and compares every output.


def run_sgd(n, dtype, device, offset=0, seed=0, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
            nesterov=False, maximize=False, first_step=False):
    gen = torch.Generator().manual_seed(seed)
    t = {
        "param": randn(n, dtype, device, gen),
        "grad": randn(n, dtype, device, gen),
        "momentum_buffer": randn(n, dtype, device, gen) if momentum != 0 else None,
    }
    a, b = twins(t, offset)
    kw = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
              maximize=maximize, first_step=first_step)
    ref.sgd_step_(a["param"], a["grad"], a["momentum_buffer"], lr, **kw)
    cpp.sgd_step_(b["param"], b["grad"], b["momentum_buffer"], lr, **kw)
    assert_all(b, a, ("param", "grad", "momentum_buffer"))


def run_adam(n, dtype, device, offset=0, seed=0, step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
             weight_decay=0.0, amsgrad=False, maximize=False):
    gen = torch.Generator().manual_seed(seed)
    v = rand(n, dtype, device, gen)
    t = {
        "param": randn(n, dtype, device, gen),
        "grad": randn(n, dtype, device, gen),
        "exp_avg": randn(n, dtype, device, gen, scale=0.1),
        "exp_avg_sq": v,
        "max_exp_avg_sq": (v + rand(n, dtype, device, gen) * 0.5).to(dtype) if amsgrad else None,
    }
    a, b = twins(t, offset)
    kw = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ref.adam_step_(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], a["max_exp_avg_sq"], step, lr, **kw)
    cpp.adam_step_(b["param"], b["grad"], b["exp_avg"], b["exp_avg_sq"], b["max_exp_avg_sq"], step, lr, **kw)
    assert_all(b, a, ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


def _meta_inputs(n, dtype, device, seed):
    """param, anchor and a float32/64 task accumulator, as task_end_ and meta_update_ take them."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "param": randn(n, dtype, device, gen),
        "anchor": randn(n, dtype, device, gen),
        "acc": randn(n, opmath(dtype), device, gen, scale=3.0),
    }


def run_task_end(n, dtype, device, offset=0, seed=0):
    t = _meta_inputs(n, dtype, device, seed)
    a, b = twins(t, offset)
    ref.task_end_(a["param"], a["anchor"], a["acc"])
    cpp.task_end_(b["param"], b["anchor"], b["acc"])
    assert_all(b, a, ("param", "acc"))
    assert torch.equal(b["param"], t["anchor"]), "task_end_ must restore the anchor exactly"


def run_meta_update(n, dtype, device, offset=0, seed=0, meta_lr=0.7, tasks=3):
    a, b = twins(_meta_inputs(n, dtype, device, seed), offset)
    ref.meta_update_(a["param"], a["anchor"], a["acc"], meta_lr, tasks)
    cpp.meta_update_(b["param"], b["anchor"], b["acc"], meta_lr, tasks)
    assert_all(b, a, ("param", "acc"))
    assert not b["acc"].any(), "meta_update_ must zero the accumulator"


def run_batched(n, dtype, device, rows=5, offset=0, seed=0, meta_lr=0.5, write_back=True):
    gen = torch.Generator().manual_seed(seed)
    theta = randn(n, dtype, device, gen)
    tasks = randn(rows * n, dtype, device, gen)
    a_t, a_r = buffer(theta.clone(), offset), buffer(tasks.clone(), offset).view(rows, n)
    b_t, b_r = buffer(theta.clone(), offset), buffer(tasks.clone(), offset).view(rows, n)
    ref.batched_meta_update_(a_t, a_r, meta_lr, write_back=write_back)
    cpp.batched_meta_update_(b_t, b_r, meta_lr, write_back=write_back)
    assert_matches(b_t, a_t, "theta")
    assert_matches(b_r, a_r, "tasks")
    if write_back:
        assert torch.equal(b_r, b_t.unsqueeze(0).expand_as(b_r)), "write_back must copy the stored theta"
    else:
        assert torch.equal(b_r, tasks.view(rows, n)), "without write_back the rows must stay untouched"


RUNNERS = {
    "sgd_step_": run_sgd,
    "adam_step_": run_adam,
    "task_end_": run_task_end,
    "meta_update_": run_meta_update,
    "batched_meta_update_": run_batched,
}


def opcheck_samples(device: str):
    """(op name, args) for torch.library.opcheck: each op with number and tensor scalars."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        # bfloat16 (16-bit storage, float32 accumulator) needs one sample per op only.
        n = 37

        def r(d=dtype):
            return torch.randn(n, generator=gen).to(d).to(device)

        lr_t = torch.tensor(0.05, device=device)
        out += [
            ("sgd_step_", (r(), r(), r(), 0.1, None, 0.9, 0.0, 0.0, False, False, False)),
            ("sgd_step_", (r(), r(), r(), 0.0, lr_t, 0.9, 0.1, 0.01, True, True, False)),
            ("sgd_step_", (r(), r(), None, 0.1, None, 0.0, 0.0, 0.0, False, False, False)),
            ("adam_step_", (r(), r(), r(), r().abs(), None, 2.0, None, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, False)),
            (
                "adam_step_",
                (r(), r(), r(), r().abs(), r().abs(), 0.0, torch.tensor(3.0, device=device), 0.0, lr_t,
                 0.9, 0.99, 1e-8, 0.01, True, True),
            ),
            ("task_end_", (r(), r(), r(opmath(dtype)))),
            ("meta_update_", (r(), r(), r(opmath(dtype)), 0.5, None, 4.0, None)),
            (
                "meta_update_",
                (r(), r(), r(opmath(dtype)), 0.0, lr_t, 0.0, torch.tensor(2.0, device=device)),
            ),
            ("batched_meta_update_", (r(), torch.randn(3, n, generator=gen).to(dtype).to(device), 0.5, None, True)),
            ("batched_meta_update_", (r(), torch.randn(2, n, generator=gen).to(dtype).to(device), 0.0, lr_t, False)),
        ]
    seen: set[tuple[str, bool]] = set()
    keep = []
    for i, (name, args) in enumerate(out):
        is_16bit = i >= len(out) // 2
        if not is_16bit or (name, is_16bit) not in seen:
            keep.append((name, args))
            seen.add((name, is_16bit))
    return keep
