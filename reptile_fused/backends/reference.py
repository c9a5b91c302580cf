"""The pure-PyTorch backend: :mod:`reptile_fused.reference`, usable on every device."""

from __future__ import annotations

import torch

from ..reference import adam_step_, batched_meta_update_, meta_update_, sgd_step_, task_end_

__all__ = ["sgd_step_", "adam_step_", "task_end_", "meta_update_", "batched_meta_update_", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    return None
