"""Argument checks shared by every backend's flat-buffer ops, so all reject the same input the same way."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

ScalarLike = Union[float, int, Tensor]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic happens in: float32 for the 16-bit types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scalar_value(x: ScalarLike) -> float:
    """A Python float from a number or a one-element tensor (read on the host)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"a scalar tensor must have one element, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def check_scalar_tensor(x: ScalarLike, name: str, device: torch.device) -> None:
    """A tensor scalar must be one element, floating point, and on the buffers' device or the CPU."""
    if not isinstance(x, Tensor):
        return
    if x.numel() != 1 or x.dim() > 1:
        raise ValueError(f"{name} as a tensor must be 0-dim (or one element), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} as a tensor must be floating point, got {x.dtype}")
    if x.device != device and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device} but the buffers are on {device}")


def _check_one(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float64, float16, bfloat16")


def check_flat(
    param: Tensor,
    *,
    like: Tensor | None = None,
    dtype: torch.dtype | None = None,
    name: str = "param",
    **others: Tensor | None,
) -> None:
    """``param`` is a contiguous 1-D floating buffer; every non-None tensor in ``others``
    matches it in shape, device and dtype.  With ``like``, ``param`` itself is checked
    against ``like`` (its numel and device) and against ``dtype``."""
    _check_one(param, name)
    if param.dim() != 1 or not param.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D flat buffer, got shape {tuple(param.shape)}")
    if like is not None:
        if param.numel() != like.numel() or param.device != like.device:
            raise ValueError(
                f"{name} must match the parameter buffer: {param.numel()} elements on {param.device} "
                f"vs {like.numel()} on {like.device}"
            )
        if dtype is not None and param.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} for {like.dtype} parameters, got {param.dtype}")
    for other_name, t in others.items():
        if t is None:
            continue
        _check_one(t, other_name)
        if t.shape != param.shape or not t.is_contiguous():
            raise ValueError(
                f"{other_name} must be a contiguous buffer of shape {tuple(param.shape)}, got {tuple(t.shape)}"
            )
        if t.device != param.device:
            raise ValueError(f"{other_name} is on {t.device} but {name} is on {param.device}")
        if t.dtype != param.dtype:
            raise TypeError(f"{other_name} has dtype {t.dtype} but {name} has {param.dtype}")


def check_batched(theta: Tensor, tasks: Tensor) -> None:
    """``theta`` is ``[P]``, ``tasks`` is ``[n, P]`` with n >= 1, both contiguous, same device and dtype."""
    check_flat(theta, name="theta")
    _check_one(tasks, "tasks")
    if tasks.dim() != 2 or tasks.shape[1] != theta.shape[0] or not tasks.is_contiguous():
        raise ValueError(
            f"tasks must be a contiguous [n, P] buffer with P = {theta.shape[0]}, got shape {tuple(tasks.shape)}"
        )
    if tasks.shape[0] < 1:
        raise ValueError("tasks must hold at least one task row (n >= 1)")
    if tasks.device != theta.device:
        raise ValueError(f"tasks is on {tasks.device} but theta is on {theta.device}")
    if tasks.dtype != theta.dtype:
        raise TypeError(f"tasks has dtype {tasks.dtype} but theta has {theta.dtype}")
