"""The Triton backend: the five flat-buffer ops as Triton kernels.

Same signatures, checks and numerics as :mod:`reptile_fused.reference`.  Runs on CUDA
(and ROCm) tensors; on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how the tests run
without a GPU.  This module imports without Triton installed: ``unavailable_reason``
then says so, and calling an op raises :class:`~reptile_fused.BackendUnavailableError`.

Tensor scalars on the buffers' device are read by the kernels (no host sync, CUDA-graph
safe).  Tensor scalars on the CPU with CUDA buffers are read on the host, which costs
nothing.  The range checks that need a scalar's value (Adam's ``step >= 1``,
``meta_update_``'s ``n > 0``) are done for Python numbers and CPU tensors; a device
tensor is not read back for them, since that would synchronise the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import (
    ScalarLike,
    check_adam_step,
    check_batched_meta_update,
    check_meta_update,
    check_sgd_step,
    check_task_end,
    split_scalar,
)
from . import BackendUnavailableError

try:
    from .. import triton_ops as _registration
    from ..triton_kernels import interpreting as _interpreting

    # Called through torch.ops (an OpOverloadPacket), the form every torch.compile
    # release treats as an op.
    _ops = getattr(torch.ops, _registration.NAMESPACE)

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure to load Triton means "unavailable", not a crash
    _ops = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["sgd_step_", "adam_step_", "task_end_", "meta_update_", "batched_meta_update_", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton ops cannot run on ``device``, or ``None`` if they can."""
    device = torch.device(device)
    if _ops is None:
        return (
            f"Triton could not be loaded ({_IMPORT_ERROR}); install it with `pip install triton` "
            "(needs torch >= 2.6 for torch.library.triton_op)"
        )
    if device.type == "cpu":
        if _interpreting():
            return None
        return (
            "Triton runs CPU tensors only in its interpreter, a slow testing tool: set TRITON_INTERPRET=1 "
            "before Triton is first imported, or use CUDA tensors"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    return f"the Triton backend runs on CUDA (or ROCm) devices, not {device.type!r}"


def _require(device: torch.device, op: str) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend 'triton' cannot run on {device}: {reason}")


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
) -> None:
    """One ``torch.optim.SGD`` step over a flat buffer (see :func:`reptile_fused.reference.sgd_step_`)."""
    check_sgd_step(param, grad, momentum_buffer, lr, momentum)
    _require(param.device, "sgd_step_")
    lr_value, lr_t = split_scalar(lr, "lr", param.device)
    _ops.sgd_step_(
        param, grad, momentum_buffer, lr_value, lr_t,
        float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize), bool(first_step),
    )  # fmt: skip


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
) -> None:
    """One ``torch.optim.Adam`` step over a flat buffer (see :func:`reptile_fused.reference.adam_step_`)."""
    check_adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, amsgrad)
    _require(param.device, "adam_step_")
    step_value, step_t = split_scalar(step, "step", param.device)
    lr_value, lr_t = split_scalar(lr, "lr", param.device)
    _ops.adam_step_(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
        step_value, step_t, lr_value, lr_t,
        float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
    )  # fmt: skip


@torch.no_grad()
def task_end_(param: Tensor, anchor: Tensor, acc: Tensor) -> None:
    """Finish a task: ``acc += param``, then ``param <- anchor``."""
    check_task_end(param, anchor, acc)
    _require(param.device, "task_end_")
    _ops.task_end_(param, anchor, acc)


@torch.no_grad()
def meta_update_(param: Tensor, anchor: Tensor, acc: Tensor, meta_lr: ScalarLike, n: ScalarLike) -> None:
    """Reptile's meta step: ``param <- anchor + meta_lr * (acc / n - anchor)``, then ``acc <- 0``."""
    check_meta_update(param, anchor, acc, meta_lr, n)
    _require(param.device, "meta_update_")
    meta_lr_value, meta_lr_t = split_scalar(meta_lr, "meta_lr", param.device)
    n_value, n_t = split_scalar(n, "n", param.device)
    _ops.meta_update_(param, anchor, acc, meta_lr_value, meta_lr_t, n_value, n_t)


@torch.no_grad()
def batched_meta_update_(theta: Tensor, tasks: Tensor, meta_lr: ScalarLike, write_back: bool = True) -> None:
    """``theta <- theta + meta_lr * (mean over the rows of tasks - theta)``; optionally copy it into every row."""
    check_batched_meta_update(theta, tasks, meta_lr)
    _require(theta.device, "batched_meta_update_")
    meta_lr_value, meta_lr_t = split_scalar(meta_lr, "meta_lr", theta.device)
    _ops.batched_meta_update_(theta, tasks, meta_lr_value, meta_lr_t, bool(write_back))
