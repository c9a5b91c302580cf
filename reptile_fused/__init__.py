"""Reptile meta-learning for PyTorch, with fused kernels over flat parameter buffers."""

from . import reference
from .backends import BackendUnavailableError, available_backends, get_backend
from .batched import BatchedReptile, NotBatchableError
from .flat import FlatBuffer
from .functional import reptile_adapt, reptile_train
from .optimizer import MetaLRScheduler, MetaStepView, NonFiniteError, ReptileOptimizer

__version__ = "0.1.0"

__all__ = [
    "ReptileOptimizer",
    "MetaStepView",
    "MetaLRScheduler",
    "NonFiniteError",
    "BatchedReptile",
    "NotBatchableError",
    "FlatBuffer",
    "reptile_train",
    "reptile_adapt",
    "reference",
    "available_backends",
    "get_backend",
    "BackendUnavailableError",
    "__version__",
]
