"""The meta step seen as an optimizer (``MetaStepView``) and its scheduler adaptor (``MetaLRScheduler``), so LR schedulers anneal ``meta_lr``."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

if TYPE_CHECKING:
    from .optimizer import ReptileOptimizer


class _MetaLRGroup(MutableMapping):
    """A param group seen from the meta step: ``lr`` is ``meta_lr``, and nothing of the inner
    optimizer shows (so a scheduler cannot mistake the inner Adam's betas or SGD's momentum
    for the meta step's).  Keys a scheduler adds are kept in the group under ``meta_``
    (``initial_lr`` as ``initial_meta_lr``)."""

    _RENAMES = {"lr": "meta_lr", "initial_lr": "initial_meta_lr"}

    def __init__(self, group: dict):
        self._group = group

    def _key(self, key):
        if key == "params":
            return key
        return self._RENAMES.get(key, f"meta_{key}")

    def __getitem__(self, key):
        return self._group[self._key(key)]

    def __setitem__(self, key, value):
        self._group[self._key(key)] = value

    def __delitem__(self, key):
        del self._group[self._key(key)]

    def __iter__(self):
        inverse = {v: k for k, v in self._RENAMES.items()}
        for k in self._group:
            if k == "params" or k in inverse:
                yield inverse.get(k, k)
            elif k.startswith("meta_"):
                yield k[len("meta_") :]

    def __len__(self):
        return sum(1 for _ in self)


class MetaStepView(Optimizer):
    """The meta step of a ``ReptileOptimizer`` seen as an optimizer: ``lr`` is ``meta_lr``
    and ``step()`` is ``meta_step()``.  Exists so standard LR schedulers can anneal ε."""

    def __init__(self, owner: ReptileOptimizer):
        # Deliberately not calling Optimizer.__init__: this view owns no parameters.
        self._owner = owner
        self.defaults = {"lr": owner.defaults["meta_lr"]}
        self.state = {}
        self._opt_called = False

    @property
    def param_groups(self) -> list[_MetaLRGroup]:
        return [_MetaLRGroup(g) for g in self._owner.param_groups]

    def step(self, closure=None):
        self._owner.meta_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._owner.zero_grad(set_to_none)

    def state_dict(self):
        return self._owner.state_dict()

    def load_state_dict(self, state_dict):
        self._owner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"MetaStepView({self._owner.__class__.__name__})"


class MetaLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler on ``opt.meta_optimizer`` presented as a scheduler of ``opt`` itself.

    For frameworks that accept only schedulers of the optimizers they were given
    (PyTorch Lightning's ``configure_optimizers``)::

        sched = MetaLRScheduler(LinearLR(opt.meta_optimizer, 1.0, 0.0, total_iters=n))
        return {"optimizer": opt, "lr_scheduler": sched}

    ``optimizer`` is the ``ReptileOptimizer``; ``step()``, ``get_last_lr()``,
    ``state_dict()`` and ``load_state_dict()`` are the wrapped scheduler's, so it anneals
    each group's ``meta_lr`` and never the inner ``lr``.
    """

    def __init__(self, scheduler):
        # Deliberately not calling LRScheduler.__init__: it would take a step of its own
        # and write ``initial_lr`` into the inner optimizer's groups.
        view = getattr(scheduler, "optimizer", None)
        if not isinstance(view, MetaStepView):
            raise TypeError(
                "MetaLRScheduler wraps a scheduler built on a ReptileOptimizer's meta_optimizer, e.g. "
                "MetaLRScheduler(LinearLR(opt.meta_optimizer, ...)); got one on "
                f"{type(view).__name__}"
            )
        self.scheduler = scheduler
        self.optimizer = view._owner

    def step(self, *args, **kwargs) -> None:
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def get_lr(self):
        return self.scheduler.get_lr()

    @property
    def last_epoch(self) -> int:
        return self.scheduler.last_epoch

    @property
    def base_lrs(self) -> list[float]:
        return self.scheduler.base_lrs

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"MetaLRScheduler({type(self.scheduler).__name__} on meta_lr)"
