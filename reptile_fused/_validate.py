"""Argument checks shared by every backend's flat-buffer ops, so all reject the same input the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ScalarLike = float | int | Tensor

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


# ---------------------------------------------------------------------- per-op checks
# Every backend calls these before touching memory, so all reject the same input with
# the same message, and a rejected call changes nothing.


def split_scalar(x: ScalarLike, name: str, device: torch.device) -> tuple[float, Tensor | None]:
    """A checked scalar as ``(value, tensor)`` for a kernel: a tensor on the buffers' device
    is handed over to be read there (CUDA-graph safe); numbers and CPU tensors are read on
    the host, which needs no device synchronisation."""
    check_scalar_tensor(x, name, device)
    if isinstance(x, Tensor) and x.device == device:
        return 0.0, x
    return scalar_value(x), None


def host_value(x: ScalarLike) -> float | None:
    """The scalar's value if reading it needs no device synchronisation, else ``None``."""
    if isinstance(x, Tensor) and x.device.type != "cpu":
        return None
    return scalar_value(x)


def check_update(param: Tensor, update: Tensor | None, name: str = "update") -> None:
    """First-order MAML's update buffer: laid out like ``param``, in its opmath dtype (like
    the task accumulator), and not one of the buffers the op reads."""
    if update is None:
        return
    check_flat(update, like=param, dtype=opmath_dtype(param.dtype), name=name)
    # Data pointers cannot be traced (torch.compile(fullgraph=True)); as torch's own
    # optimizers do, the check is left out while compiling (the compiled graph is traced
    # from an eager-checked call's buffers; the kernels check it too).
    if not torch.compiler.is_compiling() and update.data_ptr() == param.data_ptr() and update.numel():
        raise ValueError(f"{name} must be a buffer of its own, not the parameter buffer")


def check_sgd_step(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor | None, lr: ScalarLike, momentum: float,
    update: Tensor | None = None,
) -> None:  # fmt: skip
    check_flat(param, grad=grad, momentum_buffer=momentum_buffer)
    check_update(param, update)
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("sgd_step_: momentum != 0 needs a momentum_buffer")
    check_scalar_tensor(lr, "lr", param.device)


def check_adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: ScalarLike,
    lr: ScalarLike,
    amsgrad: bool,
    update: Tensor | None = None,
    spans: Sequence[int] | None = None,
) -> None:
    """Also ``step >= 1`` where the step can be read without a device synchronisation."""
    check_flat(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq)
    check_update(param, update)
    check_spans(spans, param.numel())
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("adam_step_: amsgrad=True needs max_exp_avg_sq")
    check_scalar_tensor(step, "step", param.device)
    check_scalar_tensor(lr, "lr", param.device)
    value = host_value(step)
    if value is not None and value < 1:
        raise ValueError(f"adam_step_: step must be >= 1 (the count after this step), got {value}")


# Tuples of spans already checked, by id (each kept alive here, so an id is not reused
# while its entry stands): an optimizer passes the same tuple every step.
_CHECKED_SPANS: dict[int, tuple[tuple, int]] = {}


def check_spans(spans: Sequence[int] | None, numel: int) -> None:
    """Adam's ``spans``: ``(offset, numel)`` pairs, flattened, of the tensors a flat buffer
    packs, in buffer order, not overlapping, inside the buffer."""
    if spans is None:
        return
    compiling = torch.compiler.is_compiling()
    if not compiling:
        seen = _CHECKED_SPANS.get(id(spans))
        if seen is not None and seen[0] is spans and seen[1] == numel:
            return
    if not isinstance(spans, (list, tuple)) or not all(type(x) is int for x in spans):
        raise TypeError("spans must be a list or tuple of ints: (offset, numel) pairs, flattened")
    if len(spans) % 2:
        raise ValueError(f"spans must hold (offset, numel) pairs, got {len(spans)} values")
    end = 0
    for offset, n in zip(spans[0::2], spans[1::2]):
        if offset < end or n < 0 or offset + n > numel:
            raise ValueError(
                f"spans must be (offset, numel) pairs of tensors in buffer order, inside the buffer of {numel} "
                f"elements; got ({offset}, {n}) after a tensor ending at {end}"
            )
        end = offset + n
    if isinstance(spans, tuple) and not compiling:
        if len(_CHECKED_SPANS) >= 1024:
            _CHECKED_SPANS.clear()
        _CHECKED_SPANS[id(spans)] = (spans, numel)


def check_task_end(param: Tensor, anchor: Tensor, acc: Tensor, update: Tensor | None = None) -> None:
    check_flat(param, anchor=anchor)
    check_flat(acc, like=param, dtype=opmath_dtype(param.dtype), name="acc")
    check_update(param, update)


def check_meta_update(param: Tensor, anchor: Tensor, acc: Tensor, meta_lr: ScalarLike, n: ScalarLike) -> None:
    """Also ``n > 0`` where n can be read without a device synchronisation."""
    check_task_end(param, anchor, acc)
    check_scalar_tensor(meta_lr, "meta_lr", param.device)
    check_scalar_tensor(n, "n", param.device)
    value = host_value(n)
    if value is not None and value <= 0:
        raise ValueError(f"meta_update_: n (the number of finished tasks) must be > 0, got {value}")


def check_batched_meta_update(
    theta: Tensor, tasks: Tensor, meta_lr: ScalarLike, updates: Tensor | None = None
) -> None:
    check_batched(theta, tasks)
    check_scalar_tensor(meta_lr, "meta_lr", theta.device)
    if updates is not None:
        _check_one(updates, "updates")
        if updates.shape != tasks.shape or not updates.is_contiguous():
            raise ValueError(
                f"updates must be a contiguous buffer of the tasks' shape {tuple(tasks.shape)}, got {tuple(updates.shape)}"
            )
        if updates.device != theta.device:
            raise ValueError(f"updates is on {updates.device} but theta is on {theta.device}")
        if updates.dtype != opmath_dtype(theta.dtype):
            raise TypeError(
                f"updates must have dtype {opmath_dtype(theta.dtype)} for {theta.dtype} parameters, got {updates.dtype}"
            )
