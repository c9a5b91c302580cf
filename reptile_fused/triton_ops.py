"""The Triton kernels as ``torch.library`` ops in the ``reptile_fused_triton`` namespace.

``torch.library.triton_op`` lets ``torch.compile`` see through each op to the Triton
kernel inside (instead of treating it as an opaque call), so it can be captured in
a graph without a break.  Importing this module imports Triton.

Schemas cannot say "a float or a tensor", so each scalar that may be a 0-dim tensor
is two arguments: ``x: float`` and ``x_t: Tensor?`` (the tensor wins when given).
Arguments are expected to be validated already: call these through
:mod:`reptile_fused.backends.triton`, which does.
"""

# No `from __future__ import annotations`: triton_op infers each schema from the
# annotations, which must be real types.
from typing import Optional

from torch import Tensor
from torch.library import triton_op

from . import triton_kernels as _k

NAMESPACE = "reptile_fused_triton"


@triton_op(f"{NAMESPACE}::sgd_step_", mutates_args={"param", "momentum_buffer"})
def sgd_step_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    lr: float,
    lr_t: Optional[Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    _k.sgd(param, grad, momentum_buffer, lr, lr_t, momentum, dampening, weight_decay, nesterov, maximize, first_step)


@triton_op(f"{NAMESPACE}::adam_step_", mutates_args={"param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: float,
    step_t: Optional[Tensor],
    lr: float,
    lr_t: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    _k.adam(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
        step, step_t, lr, lr_t, beta1, beta2, eps, weight_decay, amsgrad, maximize,
    )  # fmt: skip


@triton_op(f"{NAMESPACE}::task_end_", mutates_args={"param", "acc"})
def task_end_(param: Tensor, anchor: Tensor, acc: Tensor) -> None:
    _k.task_end(param, anchor, acc)


@triton_op(f"{NAMESPACE}::meta_update_", mutates_args={"param", "acc"})
def meta_update_(
    param: Tensor,
    anchor: Tensor,
    acc: Tensor,
    meta_lr: float,
    meta_lr_t: Optional[Tensor],
    n: float,
    n_t: Optional[Tensor],
) -> None:
    _k.meta_update(param, anchor, acc, meta_lr, meta_lr_t, n, n_t)


@triton_op(f"{NAMESPACE}::batched_meta_update_", mutates_args={"theta", "tasks"})
def batched_meta_update_(
    theta: Tensor,
    tasks: Tensor,
    meta_lr: float,
    meta_lr_t: Optional[Tensor],
    write_back: bool,
) -> None:
    _k.batched_meta_update(theta, tasks, meta_lr, meta_lr_t, write_back)
