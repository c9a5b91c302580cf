"""The inner optimizers (SGD and Adam, ``torch.optim`` semantics) over flat buffers.

One place owns what both Reptile front ends need of them, as ``torch/optim/sgd.py``
keeps its functional ``sgd()`` apart from the class: the names, the hyperparameters
and their checks, the state buffers each keeps, and the one backend call that steps
a flat buffer.  :class:`~reptile_fused.ReptileOptimizer` calls :func:`step_` on
segments of its flat buffers, :class:`~reptile_fused.BatchedReptile` on its whole
``[n, P]`` task buffer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import Tensor

from ._validate import ScalarLike

__all__ = ["INNER_OPTIMIZERS", "STATE_KEYS", "check_inner_optimizer", "check_hyperparameters", "state_keys", "step_"]

INNER_OPTIMIZERS = ("sgd", "adam")

# Every state buffer an inner optimizer can keep, in state_dict order (torch's names).
STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def check_inner_optimizer(name: str) -> None:
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {name!r}")


def check_hyperparameters(h: Mapping[str, Any]) -> None:
    """The hyperparameters of a param group (or of ``BatchedReptile``), checked as torch.optim checks them."""

    def number(name):
        v = h[name]
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"{name} as a tensor must have one element")
            v = float(v.item())
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            raise ValueError(f"invalid {name}: {h[name]!r}")
        return v

    if number("lr") < 0:
        raise ValueError(f"invalid learning rate: {h['lr']}")
    if number("meta_lr") < 0:
        raise ValueError(f"invalid meta_lr: {h['meta_lr']}")
    if number("momentum") < 0:
        raise ValueError(f"invalid momentum: {h['momentum']}")
    if number("weight_decay") < 0:
        raise ValueError(f"invalid weight_decay: {h['weight_decay']}")
    if number("eps") < 0:
        raise ValueError(f"invalid eps: {h['eps']}")
    number("dampening")
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening")
    betas = h["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas} (each must be in [0, 1))")


def state_keys(inner_optimizer: str, h: Mapping[str, Any]) -> tuple[str, ...]:
    """The state buffers a step with hyperparameters ``h`` reads and writes."""
    if inner_optimizer == "sgd":
        return ("momentum_buffer",) if h["momentum"] != 0 else ()
    return STATE_KEYS["adam"] if h["amsgrad"] else STATE_KEYS["adam"][:2]


def step_(
    backend: ModuleType,
    inner_optimizer: str,
    h: Mapping[str, Any],
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Tensor],
    *,
    lr: ScalarLike,
    step: ScalarLike,
    first_step: bool,
) -> None:
    """One inner optimizer step over a flat buffer, in one backend call.

    ``state`` holds the buffers :func:`state_keys` names, laid out like ``param``.
    ``lr`` may differ from ``h["lr"]`` (a device tensor a CUDA graph reads).  SGD uses
    ``first_step`` (its momentum buffer holds nothing yet: torch's first-step rule),
    Adam uses ``step`` (the count after this step, for the bias corrections).
    """
    if inner_optimizer == "sgd":
        backend.sgd_step_(
            param, grad, state.get("momentum_buffer"), lr,
            momentum=h["momentum"], dampening=h["dampening"], weight_decay=h["weight_decay"],
            nesterov=h["nesterov"], maximize=h["maximize"], first_step=first_step,
        )  # fmt: skip
    else:
        beta1, beta2 = h["betas"]
        backend.adam_step_(
            param, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"), step, lr,
            beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=h["weight_decay"],
            amsgrad=h["amsgrad"], maximize=h["maximize"],
        )  # fmt: skip
