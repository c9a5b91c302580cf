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

__all__ = [
    "ALGORITHMS", "check_algorithm", "INNER_OPTIMIZERS", "HYPERPARAMETERS", "DEFAULTS", "STATE_KEYS", "check_inner_optimizer", "hyperparameters",
    "check_hyperparameters", "check_implementation_flags", "state_keys", "step_", "adam_betas",
    "check_tensor_hyperparameters",
]  # fmt: skip

INNER_OPTIMIZERS = ("sgd", "adam")

# What a task contributes to the meta step: "reptile" its whole adaptation θ̃ − θ,
# "fomaml" (first-order MAML) its last inner step's update θ̃ − θ_{k-1}.
ALGORITHMS = ("reptile", "fomaml")


def check_algorithm(name: str) -> None:
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")

# Every state buffer an inner optimizer can keep, in state_dict order (torch's names).
STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def check_inner_optimizer(name: str) -> None:
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {name!r}")


# Each inner optimizer's hyperparameters (besides Reptile's meta_lr), torch.optim's names.
HYPERPARAMETERS = {
    "sgd": ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
}
# torch.optim's defaults, except Adam's betas: the Reptile authors' (0, 0.999).
DEFAULTS = {
    "lr": 1e-3,
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "maximize": False,
    "betas": (0.0, 0.999),
    "eps": 1e-8,
    "amsgrad": False,
}


def hyperparameters(inner_optimizer: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The inner optimizer's hyperparameters from the keyword arguments ``given`` (``None``:
    not given, use the default).  A hyperparameter of the other inner optimizer is refused:
    torch.optim.SGD has no ``betas``, torch.optim.Adam no ``momentum``."""
    own = HYPERPARAMETERS[inner_optimizer]
    foreign = sorted(k for k, v in given.items() if v is not None and k not in own and k in DEFAULTS)
    if foreign:
        raise ValueError(
            f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a hyperparameter of "
            f"inner_optimizer={inner_optimizer!r} (it takes {', '.join(own)})"
        )
    return {k: DEFAULTS[k] if given.get(k) is None else given[k] for k in own}


def check_implementation_flags(flags: Mapping[str, Any]) -> None:
    """torch.optim's implementation switches.  One kernel per flat buffer runs whatever they
    say; ``fused`` chooses which of torch's Adam arithmetics it reproduces (``True``:
    ``torch.optim.Adam(fused=True)``'s, else the for-loop one, torch's default on the CPU),
    ``foreach`` and ``capturable`` are accepted and do nothing, ``differentiable=True`` is
    refused, and ``fused=True`` with ``foreach=True`` is refused as torch refuses it."""
    if flags.get("fused") and flags.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if flags.get("differentiable"):
        raise ValueError(
            "differentiable=True is not supported: the inner steps run in fused kernels outside autograd, "
            "so no gradient flows through them (Reptile needs none). Use differentiable=False (the default)."
        )
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r}")


def _number(h: Mapping[str, Any], name: str) -> float:
    v = h[name]
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        v = float(v.item())
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"invalid {name}: {h[name]!r} (it must be a finite number)")
    return v


# Switches that torch.optim reads with ``if``: any truthy value (the string "no") would
# switch them on, so only bools are taken.
_FLAGS = ("maximize", "nesterov", "amsgrad")


def check_hyperparameters(h: Mapping[str, Any], inner_optimizer: str | None = None) -> None:
    """The hyperparameters present in ``h`` (a param group, or ``BatchedReptile``'s), checked
    as torch.optim checks them, and more strictly: numbers must be finite (an infinite
    ``meta_lr`` or ``lr`` turns the weights into nan at the first step) and switches
    bools.  With ``inner_optimizer``, also what that optimizer's kernels cannot reproduce
    exactly is refused.

    The one check of hyperparameters: construction, ``add_param_group``,
    ``load_state_dict`` (so a checkpoint's too) and ``BatchedReptile``'s setters call it."""
    for name in ("lr", "meta_lr", "momentum", "weight_decay", "eps"):
        if name in h and _number(h, name) < 0:
            label = "learning rate" if name == "lr" else name
            raise ValueError(f"invalid {label}: {h[name]} (it must be >= 0)")
    if "dampening" in h:
        _number(h, "dampening")
    for name in _FLAGS:
        if name in h and not isinstance(h[name], bool):
            raise TypeError(f"{name} must be True or False, got {h[name]!r}")
    if h.get("nesterov") and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening")
    if "betas" in h:
        betas = h["betas"]
        if len(betas) != 2:
            raise ValueError(f"invalid betas: {betas} (two values, each in [0, 1))")
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"invalid betas: {betas} (each must be in [0, 1))")


def check_tensor_hyperparameters(h: Mapping[str, Any], foreach: bool | None, capturable: bool | None) -> None:
    """Adam's Tensor ``lr`` and ``betas`` are refused where torch.optim.Adam refuses them:
    with ``foreach=True`` and ``capturable`` off (its foreach kernels take numbers there)."""
    if not foreach or capturable:
        return
    if isinstance(h.get("lr"), Tensor):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    for i, b in enumerate(h.get("betas", ())):
        if isinstance(b, Tensor):
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")


def adam_betas(h: Mapping[str, Any]) -> tuple[float, float]:
    """Adam's betas as Python floats.  Tensor betas are read on the host at every step (torch's
    fused Adam reads them the same way; under ``torch.compile`` the read is a graph break, so
    keep betas floats there: a Tensor ``lr`` is what lets a schedule run without recompiling)."""
    return tuple(float(b) if isinstance(b, Tensor) else b for b in h["betas"])


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
    update: Tensor | None = None,
    fused: bool = False,
    spans: tuple[int, ...] | None = None,
) -> None:
    """One inner optimizer step over a flat buffer, in one backend call.

    ``state`` holds the buffers :func:`state_keys` names, laid out like ``param``.
    ``lr`` may differ from ``h["lr"]`` (a device tensor a CUDA graph reads).  SGD uses
    ``first_step`` (its momentum buffer holds nothing yet: torch's first-step rule),
    Adam uses ``step`` (the count after this step, for the bias corrections).
    ``update`` (opmath dtype) receives the step's own update, new minus old parameter,
    written in the same pass (first-order MAML's direction is the last one).
    ``fused`` (Adam): ``torch.optim.Adam(fused=True)``'s arithmetic instead of the for-loop
    one, with ``spans`` the ``(offset, numel)`` pairs of the tensors ``param`` packs
    (see :func:`reptile_fused.reference.adam_step_`).  SGD has one arithmetic.
    """
    if inner_optimizer == "sgd":
        backend.sgd_step_(
            param, grad, state.get("momentum_buffer"), lr,
            momentum=h["momentum"], dampening=h["dampening"], weight_decay=h["weight_decay"],
            nesterov=h["nesterov"], maximize=h["maximize"], first_step=first_step, update=update,
        )  # fmt: skip
    else:
        beta1, beta2 = adam_betas(h)
        backend.adam_step_(
            param, grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"), step, lr,
            beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=h["weight_decay"],
            amsgrad=h["amsgrad"], maximize=h["maximize"], update=update,
            **({"fused": True, "spans": spans} if fused else {}),
        )  # fmt: skip
