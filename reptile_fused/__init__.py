"""Reptile meta-learning for PyTorch, with fused kernels over flat parameter buffers."""

from . import reference
from .backends import BackendUnavailableError, available_backends, get_backend

__version__ = "0.1.0"

__all__ = ["reference", "available_backends", "get_backend", "BackendUnavailableError", "__version__"]
