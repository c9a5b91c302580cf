"""The backend seam: every backend implements the same five in-place flat-buffer ops.

A backend is a module exposing ``sgd_step_``, ``adam_step_``, ``task_end_``,
``meta_update_`` and ``batched_meta_update_`` with the signatures and numerics of
:mod:`reptile_fused.reference`, plus ``unavailable_reason(device) -> str | None``
(``None`` when it can run on that device).  ``"auto"`` picks the fastest backend
that can run on the tensors' device.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "cpp", "triton")

# Fastest first.  Triton is never chosen for CPU tensors: on the CPU it only runs in
# its (slow) interpreter, which is a testing tool, not a backend.
_AUTO_ORDER = {"cuda": ("cpp", "triton", "reference"), "cpu": ("cpp", "reference")}


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run on the given device."""


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        return None, str(exc)
    return module, None


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or ``None`` if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    module, error = _load(name)
    if module is None:
        return error
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    names = [n for n in order if unavailable_reason(n, device) is None]
    names += [n for n in BACKENDS if n not in names and unavailable_reason(n, device) is None]
    return names


def get_backend(name: str, device: torch.device | str) -> ModuleType:
    """The backend module called ``name`` (or the best one, for ``"auto"``) for ``device``."""
    device = torch.device(device)
    if name == "auto":
        # Stop at the first that can run: probing the others would import them (Triton is slow to import).
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return _load(candidate)[0]
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return _load(name)[0]
