"""Faster vmap rules for the layers of few-shot conv nets, built on private ``torch._C._functorch``.

This is the code most likely to break with a new torch release: it unwraps vmap's
batched tensors to run batch norm, pooling and (on the CPU) convolutions over the
tasks folded into the channels.  :data:`CAN_FOLD` is False where the private API it
needs is missing; :class:`~reptile_fused.BatchedReptile` then runs plain vmap, which is
slower but gives the same results.  Every rule returns ``NotImplemented`` for inputs it
does not handle, which falls back to vmap's own rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["CAN_FOLD", "FoldTasksIntoChannels"]


_functorch = getattr(torch._C, "_functorch", None)
CAN_FOLD = _functorch is not None and all(
    hasattr(_functorch, name)
    for name in ("is_batchedtensor", "maybe_get_level", "maybe_current_level", "_unwrap_batched", "_add_batch_dim")
)


def _fold_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch-statistics batch norm of n tasks as ONE batch norm over n·C channels.

    vmap's own rule for a batched weight normalises without the affine part and then
    applies it with separate broadcast multiply/add passes (forward and backward),
    which made batch norm cost the vmapped conv net more than the convolutions saved.
    Per-task statistics over (batch, space) of each channel are exactly per-channel
    statistics once the task dimension is folded into the channels, and the per-task
    weights become one [n·C] weight.  Returns NotImplemented for anything else.
    """
    if running_mean is not None or running_var is not None:
        return NotImplemented
    level = _functorch.maybe_current_level()
    if level is None or not _functorch.is_batchedtensor(input) or _functorch.maybe_get_level(input) != level:
        return NotImplemented
    x, x_dim = _functorch._unwrap_batched(input, level)
    if x.dim() < 3:
        return NotImplemented
    x = x.movedim(x_dim, 1)  # [B, n, C, ...]: vmapped convolutions already produce this layout
    batch, n, channels = x.shape[:3]
    affine = []
    for t in (weight, bias):
        if t is None:
            affine.append(None)
        elif _functorch.is_batchedtensor(t):
            if _functorch.maybe_get_level(t) != level:
                return NotImplemented
            value, dim = _functorch._unwrap_batched(t, level)
            affine.append(value.movedim(dim, 0).reshape(n * channels))
        else:  # shared by all tasks (a frozen affine parameter)
            affine.append(t.unsqueeze(0).expand(n, channels).reshape(n * channels))
    out = F.batch_norm(x.reshape(batch, n * channels, *x.shape[3:]), None, None, affine[0], affine[1], training, momentum, eps)
    return _functorch._add_batch_dim(out.view(batch, n, channels, *x.shape[3:]), 1, level)


def _fold_channelwise(func, logical_rank: int, input, *args, **kwargs):
    """A per-channel op (pooling) on n tasks as one op over n·C channels.

    vmap's pooling rules fold the task dimension into the *batch* dimension, which
    needs the [n, B, ...] layout, while vmapped convolutions produce [B, n·C, ...]:
    every pooling layer then cost two full copies of its input.  Pooling treats each
    channel independently, so folding the tasks into the channels is exact and free.
    """
    if kwargs.get("return_indices") or any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
        return NotImplemented
    level = _functorch.maybe_current_level()
    if level is None or not _functorch.is_batchedtensor(input) or _functorch.maybe_get_level(input) != level:
        return NotImplemented
    x, x_dim = _functorch._unwrap_batched(input, level)
    if x.dim() != logical_rank + 1:  # an unbatched [C, ...] input has no batch dimension to keep
        return NotImplemented
    x = x.movedim(x_dim, 1)
    batch, n, channels = x.shape[:3]
    out = func(x.reshape(batch, n * channels, *x.shape[3:]), *args, **kwargs)
    return _functorch._add_batch_dim(out.view(batch, n, channels, *out.shape[2:]), 1, level)


def _unwrap_at(t, level: int, dim: int):
    """``t``'s physical tensor with the task dimension at ``dim``, or None if it is not batched at ``level``."""
    if not _functorch.is_batchedtensor(t) or _functorch.maybe_get_level(t) != level:
        return None
    value, bdim = _functorch._unwrap_batched(t, level)
    return value.movedim(bdim, dim)


def _conv_per_task(func, logical_rank: int, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """On the CPU, a vmapped convolution as n plain convolutions.

    vmap turns per-task weights into one grouped convolution, and oneDNN's grouped
    kernels run much slower on the CPU than n ungrouped ones of the same total size,
    which made the batched Mini-ImageNet-style net slower than the sequential loop
    (measured in ``benchmarks/bench_meta_iteration.py``).  ``unbind``/``stack``
    keep the backward to one copy each way.  CUDA keeps vmap's grouped convolution.
    """
    level = _functorch.maybe_current_level()
    if level is None or not isinstance(input, Tensor) or input.device.type != "cpu":
        return NotImplemented
    x = _unwrap_at(input, level, 1)
    w = _unwrap_at(weight, level, 0)
    if x is None or w is None or x.dim() != logical_rank + 1:
        return NotImplemented
    if bias is not None:
        b = _unwrap_at(bias, level, 0)
        biases = b.unbind(0) if b is not None else [bias] * w.shape[0]
        if b is None and _functorch.is_batchedtensor(bias):
            return NotImplemented
    else:
        biases = [None] * w.shape[0]
    outs = [
        func(xi, wi, bi, stride, padding, dilation, groups)
        for xi, wi, bi in zip(x.unbind(1), w.unbind(0), biases)
    ]
    return _functorch._add_batch_dim(torch.stack(outs, 1), 1, level)


_PER_TASK_CONV = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}

_CHANNELWISE = {
    F.max_pool1d: 3, F.max_pool2d: 4, F.max_pool3d: 5,
    F.avg_pool1d: 3, F.avg_pool2d: 4, F.avg_pool3d: 5,
    F.adaptive_avg_pool1d: 3, F.adaptive_avg_pool2d: 4, F.adaptive_avg_pool3d: 5,
}


class FoldTasksIntoChannels(TorchFunctionMode):
    """Routes batch norm and pooling calls on vmapped tasks to the folded versions above,
    keeping the [B, n·C, ...] layout of vmapped convolutions from layer to layer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _fold_batch_norm(*args, **kwargs)
        elif func in _CHANNELWISE and args:
            out = _fold_channelwise(func, _CHANNELWISE[func], *args, **kwargs)
        elif func in _PER_TASK_CONV and not kwargs:
            out = _conv_per_task(func, _PER_TASK_CONV[func], *args)
        else:
            out = NotImplemented
        if out is not NotImplemented:
            return out
        return func(*args, **kwargs)
