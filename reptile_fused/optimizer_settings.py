"""The settings of a ``ReptileOptimizer`` and the meta-batch bookkeeping they live in.

``inner_optimizer``, ``backend`` and ``memory_format`` are fixed at construction (writes
are refused, saying why); ``algorithm`` and ``reset_inner_state`` may change between
meta-batches and are checked when written, as at construction.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from . import inner
from .state_dict import _rebuild

if TYPE_CHECKING:
    from .meta_schedule import MetaStepView
    from .optimizer import ReptileOptimizer

__all__ = ["STATE_RESETS", "NonFiniteError", "OptimizerSettings"]

STATE_RESETS = ("never", "task", "meta_step")

class NonFiniteError(FloatingPointError):
    """``check_finite=True``: a task's adapted weights, or the meta step's result, hold nan
    or inf.  Raised before anything of it is applied (see ``ReptileOptimizer``)."""


def _check_reset(value) -> None:
    if value not in STATE_RESETS:
        raise ValueError(f"reset_inner_state must be one of {STATE_RESETS}, got {value!r}")


class _MetaBatchState:
    """The meta-batch bookkeeping of one ``ReptileOptimizer``, shared by reference with any wrapper.

    The settings that may change between meta-batches (``algorithm``, ``reset_inner_state``)
    live here too, so a wrapper that copied the optimizer's ``__dict__`` sees a change."""

    # No __slots__: torch 2.11's dynamo cannot trace attribute writes on a slotted object
    # (meta_step() under torch.compile ends the meta-batch here).

    def __init__(self, owner: ReptileOptimizer, algorithm: str, reset_inner_state: str):
        self.owner_ref = weakref.ref(owner)
        self.tasks_done = 0  # tasks finished since the last meta step
        self.in_task = False
        self.view: MetaStepView | None = None
        self.algorithm = algorithm
        self.reset_inner_state = reset_inner_state

    @property
    def owner(self) -> ReptileOptimizer:
        return self.owner_ref()


class OptimizerSettings:
    """The settings as properties, and the copies and ``repr`` made from them (a mixin of
    ``ReptileOptimizer``, which sets ``_meta``, ``_sync`` and the fixed ``_inner_optimizer``,
    ``_backend``, ``_memory_format``)."""

    @property
    def inner_optimizer(self) -> str:
        """``"sgd"`` or ``"adam"``, fixed at construction (the groups and state follow it)."""
        return self._inner_optimizer

    @inner_optimizer.setter
    def inner_optimizer(self, value) -> None:
        raise AttributeError(
            f"inner_optimizer is fixed at construction ({self._inner_optimizer!r}): the param groups hold its "
            "hyperparameters and the flat state its buffers. Build a new ReptileOptimizer for another one."
        )

    @property
    def backend(self) -> str:
        """The backend asked for at construction (see ``backends`` for the resolved ones)."""
        return self._backend

    @backend.setter
    def backend(self, value) -> None:
        raise AttributeError("backend is fixed at construction (the flat buffers' kernels are resolved then); "
                             "build a new ReptileOptimizer for another backend")

    @property
    def memory_format(self):
        """The parameters' layout inside the flat buffers, fixed at construction."""
        return self._memory_format

    @memory_format.setter
    def memory_format(self, value) -> None:
        raise AttributeError("memory_format is fixed at construction (the parameters are laid out in the flat "
                             "buffers then); build a new ReptileOptimizer for another layout")

    @property
    def algorithm(self) -> str:
        """``"reptile"`` or ``"fomaml"``; may change between meta-batches, not inside one."""
        return self._meta.algorithm

    @algorithm.setter
    def algorithm(self, value) -> None:
        inner.check_algorithm(value)
        if value != self._meta.algorithm and (self._meta.tasks_done or self._meta.in_task):
            raise RuntimeError(
                f"algorithm changed from {self._meta.algorithm!r} to {value!r} inside an open meta-batch "
                f"({self._meta.tasks_done} task(s) finished): they would count in the wrong direction. "
                "Call meta_step() first, then change it."
            )
        if value != self._meta.algorithm and self._sync is not None:
            raise RuntimeError("algorithm cannot change on a distributed ReptileOptimizer (every rank must agree); "
                               "build a new one")
        self._meta.algorithm = value

    @property
    def reset_inner_state(self) -> str:
        """When the inner optimizer's state is forgotten: ``"never"``, ``"task"`` or ``"meta_step"``."""
        return self._meta.reset_inner_state

    @reset_inner_state.setter
    def reset_inner_state(self, value) -> None:
        _check_reset(value)
        self._meta.reset_inner_state = value

    # ------------------------------------------------------------------ copies and display

    def __reduce_ex__(self, protocol):
        # copy.deepcopy and pickle rebuild the optimizer over (copies of) its parameters
        # and restore its state_dict; copied together with its model, the copy steps the
        # copied model's parameters.
        if self._sync is not None:
            raise TypeError(
                "a distributed ReptileOptimizer cannot be copied or pickled; save opt.state_dict() instead"
            )
        config = dict(
            inner_optimizer=self.inner_optimizer, algorithm=self.algorithm,
            reset_inner_state=self.reset_inner_state, backend=self.backend,
            memory_format=self.memory_format, check_finite=self.check_finite, fused=self.fused,
        )  # fmt: skip
        groups = [dict(g) for g in self.param_groups]
        return (_rebuild, (type(self), groups, config, self.state_dict()))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (inner_optimizer={self.inner_optimizer!r}, algorithm={self.algorithm!r}, "
                 f"backends={self.backends}, reset_inner_state={self.reset_inner_state!r}, "
                 + (f"fused={self.fused}, " if self.inner_optimizer == "adam" else "") +
                 f"tasks_in_meta_batch={self._meta.tasks_done})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {v}" for k, v in sorted(group.items()) if k not in ("params", "param_names"))
        return "\n".join(lines)
