"""``DistributedDataParallel`` inside ``ReptileOptimizer.task()``: each rank adapts to its own tasks.

DDP averages every backward's gradients over the ranks.  Inside a task that would make each
inner step follow the mean gradient of all ranks' tasks: a different algorithm from
Reptile, whose distributed mode communicates only at ``meta_step()``
(:mod:`reptile_fused.distributed`).  So while a task is open, a DDP module that wraps any
of the open tasks' parameters runs as under its own ``no_sync()``: from its first forward
in the task (from the task's start, for a task opened inside its forward) until the task
ends (normally, by an exception or rolled back) its ``require_backward_grad_sync`` is
``False``.  Outside tasks DDP behaves as always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch.distributed as dist
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle


class _OpenTask:
    def __init__(self, param_ids: frozenset[int]):
        self.param_ids = param_ids
        self.wraps: dict[Module, bool] = {}  # per DDP module: does it wrap an open task's parameters
        self.switched: list[DistributedDataParallel] = []  # whose synchronisation this task turned off


_open: list[_OpenTask] = []  # innermost last: tasks of different optimizers may nest
_hook: RemovableHandle | None = None


@contextlib.contextmanager
def local_gradients(params: Iterable[Tensor]) -> Iterator[None]:
    """The block runs with gradient synchronisation off in every DDP module wrapping one of ``params``.

    A forward pre-hook on all modules, registered only while a task is open in a process
    with an initialised process group (there is no DDP module otherwise), switches each
    such DDP module off just before its own forward reads the flag.  The hook puts every
    module call inside a task on torch's slower hook path (a few microseconds each).
    """
    global _hook
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    task = _OpenTask(frozenset(id(p) for p in params))
    _open.append(task)
    if _hook is None:
        _hook = register_module_forward_pre_hook(_before_forward)
    try:
        # A task opened inside a DDP module's forward (a training step run by DDP's forward, as
        # Lightning runs it) backpropagates before any DDP forward of its own: that module is
        # switched now.  DDP names it in a private class attribute (guarded) during its forward.
        active = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if isinstance(active, DistributedDataParallel):
            _before_forward(active, ())
        yield
    finally:
        _open.remove(task)
        # Only modules this task found synchronising: a user's own no_sync() restores its own.
        for module in task.switched:
            module.require_backward_grad_sync = True
        if not _open:
            _hook.remove()
            _hook = None


def _before_forward(module: Module, args) -> None:
    if not isinstance(module, DistributedDataParallel) or not _open:
        return
    task = _open[-1]
    wraps = task.wraps.get(module)
    if wraps is None:
        wraps = task.wraps[module] = _wraps_open_task(module)
    if not wraps:
        return
    if module.require_backward_grad_sync:
        module.require_backward_grad_sync = False
        task.switched.append(module)
    # No buffer broadcast either: ranks may run different numbers of tasks (even none), so
    # a collective inside a task could meet another rank's meta_step() all-reduce.
    module.require_forward_param_sync = False


def _wraps_open_task(ddp: DistributedDataParallel) -> bool:
    ids = frozenset().union(*(t.param_ids for t in _open))
    # Parameters DDP was told to ignore are never synchronised; those whose all-reduce it delays
    # (a private list, guarded; DDP also lists them as ignored) are, from a hook of its own.
    delayed = getattr(ddp, "_delay_all_reduce_params", None) or []
    synced = [p for name, p in ddp.module.named_parameters() if name not in ddp.parameters_to_ignore]
    if not any(id(p) in ids for p in synced + list(delayed)):
        return False
    if ddp.static_graph:
        raise RuntimeError(
            "a DistributedDataParallel module built with static_graph=True ran inside ReptileOptimizer.task(): "
            "each rank must adapt to its own tasks, so gradient synchronisation has to be off inside a task, and "
            "torch's DDP cannot turn it off with static_graph=True (its no_sync() fails on the first backward). "
            "Build DDP without static_graph, or call the unwrapped model (ddp.module) inside tasks"
        )
    if delayed:
        raise RuntimeError(
            "a DistributedDataParallel module built with delay_all_reduce_named_params ran inside "
            "ReptileOptimizer.task(): DDP all-reduces those parameters' gradients even under no_sync(), which "
            "would mix the ranks' tasks. Build DDP without it, or call the unwrapped model (ddp.module) inside tasks"
        )
    return True
