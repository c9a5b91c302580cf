"""The Triton backend: the five flat-buffer ops as Triton kernels.

Same signatures, checks and numerics as :mod:`reptile_fused.reference` (the ops are
bound from :mod:`reptile_fused.backends.op_table`).  Runs on CUDA (and ROCm) tensors;
on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported), which is how the tests run without a GPU.

This package imports without Triton installed: ``unavailable_reason`` then says so,
and calling an op raises :class:`~reptile_fused.BackendUnavailableError` (after the
argument checks, before touching memory).  ``ops`` registers the kernels as
``torch.ops.reptile_fused_triton.*`` and ``kernels`` holds the kernels and their
launchers; both import Triton, so they are loaded here only inside the guard.

Tensor scalars on the buffers' device are read by the kernels (no host sync, CUDA-graph
safe).  Tensor scalars on the CPU with CUDA buffers are read on the host, which costs
nothing.  The range checks that need a scalar's value (Adam's ``step >= 1``,
``meta_update_``'s ``n > 0``) are done for Python numbers and CPU tensors; a device
tensor is not read back for them, since that would synchronise the device.
"""

from __future__ import annotations

import torch

from .. import BackendUnavailableError
from ..op_table import OP_NAMES, OPS, bind

try:
    from . import ops as _registration
    from .kernels import interpreting as _interpreting

    # Called through torch.ops (an OpOverloadPacket), the form every torch.compile
    # release treats as an op.
    _ops = getattr(torch.ops, _registration.NAMESPACE)

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure to load Triton means "unavailable", not a crash
    _ops = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [*OP_NAMES, "unavailable_reason"]


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


def _kernel(name: str):
    # Looked up at call time: without Triton there is no op, and _require has refused already.
    return lambda *args: getattr(_ops, name)(*args)


for _op in OPS:
    globals()[_op.name] = bind(_op, _kernel(_op.name), before_call=_require)
del _op
