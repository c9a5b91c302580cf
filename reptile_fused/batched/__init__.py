"""Batched Reptile: the n tasks of a meta-batch adapt together under ``torch.func.vmap``.

* :mod:`.reptile`: :class:`BatchedReptile`, the task rows, the fused steps;
* :mod:`.adapter`: :func:`adapt_tasks` and :class:`BatchedAdapter`, many tasks adapted
  at once from a ``ReptileOptimizer``'s weights and inner state (evaluation);
* :mod:`.batchable`: what batched mode can run, and the error naming the failing layer;
* :mod:`.vmap_rules`: faster vmap rules for conv-net layers, on private functorch API;
* :mod:`.graph`: a meta-iteration recorded as a CUDA graph and replayed.
"""

from .adapter import AdaptedTasks, BatchedAdapter, adapt_tasks
from .batchable import NotBatchableError, check_batchable
from .reptile import BatchedReptile

__all__ = ["BatchedReptile", "BatchedAdapter", "adapt_tasks", "AdaptedTasks", "NotBatchableError", "check_batchable"]
