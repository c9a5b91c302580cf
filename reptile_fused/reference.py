"""Pure-PyTorch implementations of every flat-buffer op: the oracle for every kernel.

All ops work in place on contiguous 1-D flat buffers (``[n, P]`` for the batched one).

Numerics contract, shared by every backend:

* float32 and float64 buffers are updated with exactly the arithmetic of
  ``torch.optim.SGD`` / ``torch.optim.Adam`` (``foreach=False``); ``adam_step_(fused=True)``
  with that of ``torch.optim.Adam(fused=True)`` (see :func:`adam_step_`).
* The meta step is ``anchor + meta_lr * (acc / n - anchor)`` with the last
  multiply-add fused (``torch.add(anchor, d, alpha=meta_lr)``, one rounding), as
  every kernel computes it.
* float16 and bfloat16 buffers are read once and converted to float32 ("opmath"),
  every intermediate stays float32, and each output is rounded to its storage dtype
  once, on store.  In particular the parameter update uses the float32 momentum /
  moment values, not their rounded stored copies.
* The task accumulator ``acc`` always has the opmath dtype (float32 for 16-bit
  parameters), so summing many adapted tasks does not lose precision.

Scalars that a CUDA graph may need to change between replays (``lr``, ``meta_lr``,
``n``, Adam's ``step``) may be Python numbers or 0-dim tensors.  This reference reads
tensor scalars on the host (a device synchronisation on CUDA); the fused backends
read them on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._validate import (
    ScalarLike,
    check_adam_step,
    check_batched_meta_update,
    check_meta_update,
    check_sgd_step,
    check_task_end,
    opmath_dtype,
    scalar_value,
)

__all__ = [
    "sgd_step_",
    "adam_step_",
    "task_end_",
    "meta_update_",
    "batched_meta_update_",
]


def _opmath(t: Tensor) -> Tensor:
    """The tensor in opmath dtype: itself for float32/64, a float32 copy otherwise."""
    return t if t.dtype == opmath_dtype(t.dtype) else t.float()


def _div(x: Tensor, n: float, out: Tensor | None = None) -> Tensor:
    """``x / n`` correctly rounded on every device.  With a Python number, CUDA torch
    multiplies by its reciprocal instead (up to an ulp off, and every kernel divides);
    a 0-dim tensor on the device keeps the division.  ``torch.full`` fills it without a
    host copy, so this also runs inside a CUDA graph capture."""
    divisor = torch.full((), n, dtype=x.dtype, device=x.device) if x.device.type == "cuda" else n
    return torch.div(x, divisor, out=out)


def _store(dst: Tensor, value: Tensor) -> None:
    if value is not dst:
        dst.copy_(value)


def _snapshot(param: Tensor, update: Tensor | None) -> Tensor | None:
    """The parameter before a step, in opmath, when the step must record its update."""
    return None if update is None else _opmath(param).clone()


def _record_update(update: Tensor | None, param: Tensor, old: Tensor | None) -> None:
    """``update <- param - old``: the stored new value (rounded to the parameter's dtype)
    minus the value before the step, in opmath.  First-order MAML's meta-gradient is the
    last inner step's update; a fused kernel writes it in the pass that takes the step."""
    if update is not None:
        torch.sub(_opmath(param), old, out=update)


@torch.no_grad()
def sgd_step_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    lr: ScalarLike,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    update: Tensor | None = None,
) -> None:
    """One ``torch.optim.SGD`` step over a flat buffer.

    ``first_step`` says the momentum buffer holds nothing yet: it is then set to the
    (weight-decayed) gradient, with no dampening, as torch does on a param's first step.
    ``momentum_buffer`` may be ``None`` only when ``momentum == 0``.
    ``update`` (opmath dtype, optional) receives the step's own update, see :func:`_record_update`.
    """
    check_sgd_step(param, grad, momentum_buffer, lr, momentum, update)
    old = _snapshot(param, update)
    lr = scalar_value(lr)
    p = _opmath(param)
    g = _opmath(grad)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        if first_step:
            buf = g.clone()
        else:
            buf = _opmath(momentum_buffer)
            buf = buf.mul_(momentum) if buf is momentum_buffer else buf.mul(momentum)
            buf.add_(g, alpha=1 - dampening)
        _store(momentum_buffer, buf)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)
    _store(param, p)
    _record_update(update, param, old)


@torch.no_grad()
def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: ScalarLike,
    lr: ScalarLike,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    update: Tensor | None = None,
    fused: bool = False,
    spans: Sequence[int] | None = None,
) -> None:
    """One ``torch.optim.Adam`` step over a flat buffer.

    ``step`` is the step count *after* this step is counted (1 on the first step), as
    torch computes its bias corrections; the caller increments it.
    ``update`` (opmath dtype, optional) receives the step's own update, see :func:`_record_update`.

    ``fused=False``: the arithmetic of ``torch.optim.Adam(foreach=False)`` (on the CPU
    also that of ``foreach=True``), torch's own square root included.
    ``fused=True``: that of ``torch.optim.Adam(fused=True)``, here by calling torch's
    fused kernel itself on each tensor that ``spans`` names (``(offset, numel)`` pairs,
    flattened, in buffer order; ``None``: the whole buffer is one tensor).  On the CPU
    that kernel takes a correctly rounded square root and computes each tensor's last
    ``numel % W`` elements (``W`` elements per vector of torch's CPU kernels) in a scalar
    loop that contracts the second moment into a different fused multiply-add
    (``csrc/element_math.h: adam_moments_fused_tail``), so where the tensors are
    matters, not only the elements.  16-bit buffers: float32 arithmetic, the parameter
    update from the float32 moments, one rounding on store, as everywhere.
    """
    check_adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, amsgrad, update, spans)
    step = scalar_value(step)
    if step < 1:  # a device tensor is not range-checked by the shared check; here it is read anyway
        raise ValueError(f"adam_step_: step must be >= 1 (the count after this step), got {step}")
    lr = scalar_value(lr)
    old = _snapshot(param, update)
    if fused:
        pieces = [(0, param.numel())] if spans is None else list(zip(spans[0::2], spans[1::2]))
        pieces = [(o, n) for o, n in pieces if n]

        def views(t: Tensor) -> list[Tensor]:
            return [t[o : o + n] for o, n in pieces]

        if pieces:
            if torch.compiler.is_compiling():
                # A traced number in _fused_adam_'s float lr is specialised (one graph per
                # value); its Tensor-lr overload reads the same double.
                lr = torch.ones((), dtype=torch.float64, device=param.device) * lr
            torch._fused_adam_(
                views(param), views(grad), views(exp_avg), views(exp_avg_sq),
                views(max_exp_avg_sq) if amsgrad else [],
                # torch keeps the count as a float32 tensor, incremented before the kernel reads it.
                [torch.tensor(step, dtype=torch.float32, device=param.device) for _ in pieces],
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                maximize=maximize, grad_scale=None, found_inf=None,
            )  # fmt: skip
        _record_update(update, param, old)
        return
    p = _opmath(param)
    g = _opmath(grad)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    m = _opmath(exp_avg)
    m = m.lerp_(g, 1 - beta1) if m is exp_avg else m.lerp(g, 1 - beta1)
    v = _opmath(exp_avg_sq)
    v = v.mul_(beta2) if v is exp_avg_sq else v.mul(beta2)
    # addcmul_ and addcdiv_ are called as the aten ops themselves: under torch.compile,
    # dynamo rewrites Tensor.addcmul_(a, b, value=c) as fma(a * b, c, self) and
    # Tensor.addcdiv_(a, b, value=c) as fma(a / b, c, self)
    # (torch._dynamo.config.enable_dynamo_decompositions), which round differently from
    # the kernels eager torch runs (fma(c * a, b, self), self + c * a / b).
    torch.ops.aten.addcmul_.default(v, g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        vmax = torch.maximum(_opmath(max_exp_avg_sq), v)
        _store(max_exp_avg_sq, vmax)
        denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    torch.ops.aten.addcdiv_.default(p, m, denom, value=-step_size)
    _store(exp_avg, m)
    _store(exp_avg_sq, v)
    _store(param, p)
    _record_update(update, param, old)


@torch.no_grad()
def task_end_(param: Tensor, anchor: Tensor, acc: Tensor, update: Tensor | None = None) -> None:
    """Finish a task: ``acc += param`` (the adapted weights), then ``param <- anchor``.

    With ``update`` (first-order MAML: the task's last inner update, opmath dtype) the
    task counts as if it had ended at ``anchor + update``: ``acc += (anchor + update)``,
    the parenthesised sum rounded first; ``param`` is then not read.
    """
    check_task_end(param, anchor, acc, update)
    acc.add_(_opmath(param) if update is None else _opmath(anchor) + update)
    param.copy_(anchor)


@torch.no_grad()
def meta_update_(param: Tensor, anchor: Tensor, acc: Tensor, meta_lr: ScalarLike, n: ScalarLike) -> None:
    """Reptile's meta step: ``param <- anchor + meta_lr * (acc / n - anchor)``, then ``acc <- 0``."""
    check_meta_update(param, anchor, acc, meta_lr, n)
    meta_lr = scalar_value(meta_lr)
    n = scalar_value(n)
    if n <= 0:  # as for step above
        raise ValueError(f"meta_update_: n (the number of finished tasks) must be > 0, got {n}")
    a = _opmath(anchor)
    # a + meta_lr * (acc / n - a): the division and the difference rounded in turn, then
    # one fused multiply-add (torch.add with alpha), in one buffer.
    out = param if param.dtype == acc.dtype else torch.empty_like(acc)
    _div(acc, n, out=out)
    out.sub_(a)
    torch.add(a, out, alpha=meta_lr, out=out)
    _store(param, out)
    acc.zero_()


@torch.no_grad()
def batched_meta_update_(
    theta: Tensor, tasks: Tensor, meta_lr: ScalarLike, write_back: bool = True, updates: Tensor | None = None
) -> None:
    """``theta <- theta + meta_lr * (mean over the rows of tasks - theta)``.

    ``tasks`` is the ``[n, P]`` buffer of adapted task copies.  The mean is summed row by
    row in order (row 0 first) in opmath and divided by ``n`` once, the order every
    kernel follows.  With ``write_back`` the new ``theta`` is also copied into every
    row, ready for the next meta-iteration.

    With ``updates`` (first-order MAML: ``[n, P]``, opmath dtype, each task's last inner
    update) row i counts as ``theta + updates[i]`` (rounded before it is summed, as
    :func:`task_end_` does) and ``tasks`` is not read.
    """
    check_batched_meta_update(theta, tasks, meta_lr, updates)
    meta_lr = scalar_value(meta_lr)
    n = tasks.shape[0]
    t = _opmath(theta)
    if updates is None:
        rows = [_opmath(tasks[row]) for row in range(n)]
    else:
        rows = [t + updates[row] for row in range(n)]
    total = rows[0].clone()
    for row in range(1, n):
        total.add_(rows[row])
    new = torch.add(t, _div(total, n) - t, alpha=meta_lr)  # the last multiply-add fused, as in meta_update_
    theta.copy_(new)
    if write_back:
        tasks.copy_(theta.unsqueeze(0).expand_as(tasks))
