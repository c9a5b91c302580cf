"""What batched mode can run: the check before packing, and the error that names the failing layer."""

from __future__ import annotations

import traceback

from torch import nn

__all__ = ["NotBatchableError", "check_batchable", "failing_layer", "running_stat_layers"]


class NotBatchableError(RuntimeError):
    """The model cannot run in batched mode; the message names the layer and the way out."""


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name or type(model).__name__, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


def check_batchable(model: nn.Module) -> None:
    """Raise :class:`NotBatchableError` for layers that batched mode can never run.

    Normalisation layers that track running statistics update one shared buffer from
    every task; under ``vmap`` that is an in-place write of n different values into one
    tensor.  Reptile uses batch statistics anyway (``track_running_stats=False``).
    """
    bad = running_stat_layers(model)
    if bad:
        name, m = bad[0]
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NotBatchableError(
            f"layer {name!r} ({type(m).__name__}){others} tracks running statistics, which batched mode "
            "cannot keep per task. Build it with track_running_stats=False (batch statistics, as in the "
            "Reptile paper), or use the sequential mode (ReptileOptimizer / reptile_train(batched=False))."
        )


def failing_layer(exc: BaseException, model: nn.Module) -> str | None:
    """The innermost module of ``model`` whose ``forward`` is on the exception's traceback."""
    names = {id(m): (name or type(model).__name__, type(m).__name__) for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    return None if found is None else f"{found[0]!r} ({found[1]})"
