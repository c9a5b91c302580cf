"""Flat parameter buffers: the parameters of one group packed into one contiguous buffer.

Each parameter's ``.data`` becomes a view into ``FlatBuffer.data`` and its ``.grad`` a
view into ``FlatBuffer.grad``, so autograd accumulates straight into the flat gradient
and every optimizer update is one pass over one buffer, whatever the tensor count.

A parameter's slice is dense, but its element order is the parameter's own memory
format (row-major, or channels-last for a model moved with
``model.to(memory_format=torch.channels_last)``), or the one asked for: every update
rule is elementwise, so the order inside a slice never changes a result, while the
convolutions that read the weights can be much faster in one order than another.
"""

from __future__ import annotations

import itertools
import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.utils.dlpack
from torch import Tensor

from ._validate import SUPPORTED_DTYPES

# Every parameter starts at a multiple of this many elements, so a kernel's vector
# loads stay aligned at parameter boundaries (16 elements >= 32 bytes for 16-bit types).
ALIGNMENT = 16


# What ``memory_format=`` accepts, and the parameter rank each format applies to.
MEMORY_FORMATS = {None: None, torch.contiguous_format: None, torch.channels_last: 4, torch.channels_last_3d: 5}


def check_memory_format(memory_format) -> None:
    if not any(memory_format is f for f in MEMORY_FORMATS):
        raise ValueError(
            "memory_format must be None (keep each parameter's layout), torch.contiguous_format, "
            f"torch.channels_last or torch.channels_last_3d, got {memory_format!r}"
        )


def packed_strides(p: Tensor, memory_format=None) -> tuple[int, ...]:
    """The strides of ``p``'s slice in a flat buffer: dense, in the order ``memory_format``
    asks for (like ``Module.to(memory_format=...)``, only parameters of the format's rank
    change), else ``p``'s own (torch's ``preserve_format``: ``p``'s strides when it is
    dense, else the closest dense layout)."""
    check_memory_format(memory_format)
    if memory_format is torch.contiguous_format or (
        memory_format is not None and p.dim() == MEMORY_FORMATS[memory_format]
    ):
        return tuple(torch.empty(p.shape, device="meta", memory_format=memory_format).stride())
    return tuple(torch.empty_like(p, device="meta").stride())


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def packed_offsets(numels: list[int]) -> tuple[list[int], int]:
    """Where each of these parameters starts in a flat buffer (at a multiple of ALIGNMENT),
    and the buffer's length."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += _aligned(n)
    return offsets, total


@dataclass(frozen=True)
class Segment:
    """A run of consecutive parameters ``[first, last]`` and the buffer range ``[start, end)`` they span."""

    first: int
    last: int
    start: int
    end: int


def check_trainable(p: Tensor) -> None:
    """Raise if ``p`` cannot live in a flat buffer."""
    if not isinstance(p, Tensor):
        raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError("complex parameters are not supported (view them as real pairs first)")
    if not p.is_floating_point():
        raise TypeError(f"parameters must be floating point, got {p.dtype}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"parameter dtype {p.dtype} is not supported; use float32, float64, float16 or bfloat16")
    if p.layout != torch.strided:
        raise TypeError(f"parameters must be dense (strided), got layout {p.layout}")
    if not p.is_leaf:
        raise ValueError("can't optimize a non-leaf Tensor")


def check_group_params(params) -> tuple[list, list[Tensor], list[Tensor], set[torch.device]]:
    """A param group's ``params`` as torch takes them (tensors or ``(name, tensor)`` pairs,
    in an ordered collection), checked: ``(params, tensors, trainable, devices)``."""
    if isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
            "in sets will change between runs. Please use a list instead."
        )
    params = [params] if isinstance(params, Tensor) else list(params)
    tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
    for p in tensors:
        check_trainable(p)
    if len({id(p) for p in tensors}) != len(tensors):
        # torch.optim warns and then steps such a parameter once per listing.
        raise ValueError(
            "a parameter is listed twice in one param group: torch.optim would step it twice per step(); "
            "ReptileOptimizer packs each parameter once, so it refuses. List every parameter once."
        )
    trainable = [p for p in tensors if p.requires_grad]
    from .sharded import check_not_mixed  # (sharded.py builds on this module)

    check_not_mixed(trainable)
    devices = {p.device for p in trainable}
    if len(devices) > 1:
        raise ValueError(
            f"all parameters of one param group must be on one device, got {sorted(map(str, devices))}; "
            "put each device's parameters in a group of its own"
        )
    return params, tensors, trainable, devices


# Which buffer each parameter was packed into last, so an older buffer can tell
# "re-packed by another optimizer" from "moved or cast by the user".  Kept beside the
# parameters, not on them: an attribute would travel into pickles and deep copies.
_OWNERS: dict[int, tuple[weakref.ref, int]] = {}
_SERIALS = itertools.count()


def _remember_owner(p: Tensor, buffer: FlatBuffer) -> None:
    key = id(p)
    _OWNERS[key] = (weakref.ref(p, lambda _ref, key=key: _OWNERS.pop(key, None)), buffer.serial)


def _owner(p: Tensor) -> int | None:
    """The serial number of the buffer ``p`` was packed into last, or None."""
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]


# Packed parameters that a module replaced by another tensor: ``model.load_state_dict(sd,
# assign=True)`` or ``module.weight = nn.Parameter(...)``.  The optimizer still holds the
# old one, in its flat buffer, while the model computes with the new one: it would never
# train.  torch calls the hook below before the module lets go of the old parameter.
_REPLACED: dict[int, weakref.ref] = {}
_replacements = [0]  # how many replacements were seen, so a buffer checks only after one


def _on_parameter_registration(module, name, param):
    old = module._parameters.get(name) if isinstance(getattr(module, "_parameters", None), dict) else None
    if param is not None:
        _REPLACED.pop(id(param), None)  # registered (again): in a module, not left behind
    if old is not None and old is not param and _owner(old) is not None:
        key = id(old)
        _REPLACED[key] = weakref.ref(old, lambda _ref, key=key: _REPLACED.pop(key, None))
        _replacements[0] += 1
    return None


torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registration)


def _replaced(p: Tensor) -> bool:
    entry = _REPLACED.get(id(p))
    return entry is not None and entry() is p


class FlatBuffer:
    """One device/dtype's parameters of one param group, packed contiguously.

    Padding between parameters is zero in ``data`` and ``grad`` and every update
    rule maps (0, 0) to 0, so kernels may run over padding as if it were a parameter.
    """

    # A ShardedFlatBuffer (reptile_fused.sharded) leaves its parameters where FSDP2 keeps them.
    sharded = False

    def __init__(self, params: list[Tensor], memory_format=None):
        self._take(params)
        self.serial = next(_SERIALS)
        self._lay_out([p.shape for p in self.params], [packed_strides(p, memory_format) for p in self.params])
        self.grad = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
        self.grad_views = [self._view(self.grad, i) for i in range(len(self.params))]
        with torch.no_grad():
            for i, p in enumerate(self.params):
                self._view(self.data, i).copy_(p)
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError("sparse gradients are not supported")
                    self.grad_views[i].copy_(p.grad)
        for i, p in enumerate(self.params):
            p.data = self._own_storage_view(i)
            p.grad = self.grad_views[i]
            _remember_owner(p, self)
        self._data_ptrs = [p.data_ptr() for p in self.params]
        self._grad_ptrs = [g.data_ptr() for g in self.grad_views]

    def _take(self, params: list[Tensor]) -> None:
        """Check ``params`` (trainable, of one device and dtype) and keep them."""
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        self.params = list(params)
        self.device = params[0].device
        self.dtype = params[0].dtype
        for p in self.params:
            check_trainable(p)
            if p.device != self.device or p.dtype != self.dtype:
                raise ValueError("a FlatBuffer holds parameters of one device and dtype")

    def _lay_out(self, shapes: list, strides: list) -> None:
        """Each parameter's slice of the flat layout (its shape and element order there), and ``data``."""
        self.shapes = list(shapes)
        self.strides = list(strides)
        self.numels = [math.prod(shape) for shape in self.shapes]
        self.offsets, self.numel = packed_offsets(self.numels)
        self.data = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
        self._whole = (Segment(0, len(self.params) - 1, 0, self.numel),)
        self._replacements_seen = _replacements[0]

    def _own_storage_view(self, i: int) -> Tensor:
        """Parameter ``i``'s slice of ``data`` as a tensor with a storage of its own.

        Same memory as ``view(data, i)``, but the storage object (``untyped_storage()``,
        its ``data_ptr()`` and ``nbytes()``) covers this parameter alone: tools that find
        tied weights by storage (safetensors, Accelerate, Transformers) see separate
        tensors rather than ``n`` views of one storage to deduplicate.  DLPack's
        zero-copy exchange builds it; the new storage keeps the flat buffer alive.
        """
        return torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(self._view(self.data, i)))

    def _view(self, buf: Tensor, i: int) -> Tensor:
        off = self.offsets[i]
        return buf[off : off + self.numels[i]].as_strided(self.shapes[i], self.strides[i])

    def view(self, buf: Tensor, i: int) -> Tensor:
        """Parameter ``i``'s slice of a buffer laid out like ``data`` (e.g. optimizer state)."""
        return self._view(buf, i)

    def row_view(self, rows: Tensor, i: int) -> Tensor:
        """Parameter ``i`` of every row of an ``[n, numel]`` buffer, as one ``[n, *shape]`` view."""
        off = self.offsets[i]
        piece = rows[:, off : off + self.numels[i]]
        return piece.as_strided((rows.shape[0], *self.shapes[i]), (rows.stride(0), *self.strides[i]))

    def pull(self) -> None:
        """Bring ``data`` up to date with the parameters: nothing to do, they are its views."""

    def push(self) -> None:
        """Make the parameters show ``data``: nothing to do, they are its views."""

    def entry_shape(self, i: int) -> torch.Size:
        """The shape of parameter ``i``'s tensors in a state_dict (the parameter's own)."""
        return self.shapes[i]

    def wrap_entry(self, i: int, local: Tensor) -> Tensor:
        """A state_dict tensor for parameter ``i`` from its slice of a flat buffer.  Here the
        slice itself; a buffer of sharded (DTensor) parameters wraps it like the parameter."""
        return local

    def unwrap_entry(self, i: int, value: Tensor) -> Tensor:
        """The values to copy into parameter ``i``'s slice from a state_dict tensor (the inverse of :meth:`wrap_entry`)."""
        return value

    def new_buffer(self, dtype: torch.dtype | None = None) -> Tensor:
        """A zero buffer with this layout (optimizer state, the anchor, the task accumulator)."""
        return torch.zeros(self.numel, device=self.device, dtype=dtype or self.dtype)

    def check_layout(self) -> None:
        """Raise if a parameter no longer lives in this buffer (moved with ``.to()``, ``.half()``, ...)."""
        if torch.compiler.is_compiling():
            # Data pointers cannot be traced (torch.compile(opt.step, fullgraph=True)).
            # Inside a compiled step only what the compiler guards on is checked; a
            # compiled step re-traces when a device, dtype or shape changes, and the
            # eager task(), meta_step() and state_dict() run the full check below.
            self._check_device_dtype()
            return
        if _replacements[0] != self._replacements_seen:
            self._check_replaced()
        # Runs every step: one C-level pass over the pointers in the common case.
        if list(map(Tensor.data_ptr, self.params)) == self._data_ptrs:
            return
        for i, p in enumerate(self.params):
            owner = _owner(p)
            if owner is not None and owner != self.serial and p.data_ptr() != self._data_ptrs[i]:
                raise RuntimeError(
                    f"parameter {i} of shape {tuple(self.shapes[i])} was re-packed into the flat buffer of another "
                    "optimizer (a second ReptileOptimizer or BatchedReptile built over the same parameters), so "
                    "this one no longer holds it; only the newest optimizer over a parameter can update it. Keep "
                    "one optimizer per set of parameters (to start another from this one's state, use state_dict())."
                )
            if p.data_ptr() != self._data_ptrs[i]:
                self._moved(i, p)
        self._check_device_dtype()

    def _check_replaced(self) -> None:
        for i, p in enumerate(self.params):
            if _replaced(p):
                raise RuntimeError(
                    f"parameter {i} of shape {tuple(self.shapes[i])} was replaced in its module by another tensor "
                    "(model.load_state_dict(..., assign=True), or a new nn.Parameter assigned to the attribute): the "
                    "model now computes with a tensor this optimizer does not hold, so it would never train. Load "
                    "without assign=True (that copies into the flat buffer), or build the optimizer after loading."
                )
        self._replacements_seen = _replacements[0]

    def _check_device_dtype(self) -> None:
        for i, p in enumerate(self.params):
            if p.device != self.device or p.dtype != self.dtype:
                self._moved(i, p)

    def _moved(self, i: int, p: Tensor) -> None:
        raise RuntimeError(
            f"parameter {i} of shape {tuple(self.shapes[i])} no longer lives in the optimizer's flat "
            f"buffer (it is now {p.dtype} on {p.device}; the buffer is {self.dtype} on {self.device}). "
            "Moving, casting or changing the memory format of a model after creating its optimizer "
            "is not supported: do that first, then create the ReptileOptimizer (or pass it memory_format=)."
        )

    def pending_grads(self) -> tuple[list[bool] | None, list[tuple[int, Tensor]]]:
        """Which parameters have a gradient this step (``None``: all of them, in the buffer),
        and the ones autograd put outside the buffer.

        Checks only; nothing is modified, so a bad gradient anywhere leaves everything as it was.
        """
        grads = [p.grad for p in self.params]
        if (
            all(map(operator.is_, grads, self.grad_views))
            and (torch.compiler.is_compiling() or list(map(Tensor.data_ptr, grads)) == self._grad_ptrs)
            and all(p.requires_grad for p in self.params)
        ):
            # (Under torch.compile identity is enough: the views are the buffer's own.)
            return None, []
        active = []
        foreign = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None or (not p.requires_grad and g is self.grad_views[i]):
                # No gradient; or frozen after packing (requires_grad_(False)) with only the
                # buffer's own view attached, which autograd no longer fills: torch.optim
                # sees p.grad None after zero_grad() and leaves it alone, so do we.
                active.append(False)
                continue
            active.append(True)
            if g is self.grad_views[i] and g.data_ptr() == self._grad_ptrs[i]:
                continue
            if g.is_sparse:
                raise RuntimeError("sparse gradients are not supported by ReptileOptimizer")
            if g.shape != self.shapes[i]:
                raise RuntimeError(f"gradient of parameter {i} has shape {tuple(g.shape)}, expected {tuple(self.shapes[i])}")
            if g.device != self.device:
                raise RuntimeError(f"gradient of parameter {i} is on {g.device}, the parameter on {self.device}")
            if g.is_complex() or not g.is_floating_point():
                raise RuntimeError(f"gradient of parameter {i} has dtype {g.dtype}")
            foreign.append((i, g))
        return active, foreign

    def adopt_grads(self, foreign: list[tuple[int, Tensor]]) -> None:
        """Copy gradients that autograd allocated elsewhere into the buffer and re-attach the views."""
        if not foreign:
            return
        with torch.no_grad():
            torch._foreach_copy_([self.grad_views[i] for i, _ in foreign], [g for _, g in foreign])
        for i, _ in foreign:
            self.params[i].grad = self.grad_views[i]

    def zero_grad(self, set_to_none: bool) -> None:
        """One fill of the flat gradient; with ``set_to_none`` the views are detached (torch's default)."""
        self.grad.zero_()
        for i, p in enumerate(self.params):
            p.grad = None if set_to_none else self.grad_views[i]

    def segments(self, keys: list) -> list[tuple[object, Segment]]:
        """Maximal runs of consecutive parameters with equal keys, skipping keys that are ``None``.

        When every key is the same the single segment covers the whole buffer, so the
        common case is one kernel launch.
        """
        if keys and keys[0] is not None and keys.count(keys[0]) == len(keys):
            return [(keys[0], self._whole[0])]
        runs: list[tuple[object, Segment]] = []
        start = None
        for i, k in enumerate(keys + [None]):
            if start is not None and (k is None or k != keys[start]):
                last = i - 1
                seg = Segment(start, last, self.offsets[start], self.offsets[last] + _aligned(self.numels[last]))
                runs.append((keys[start], seg))
                start = None
            if start is None and k is not None and i < len(keys):
                start = i
        return runs
