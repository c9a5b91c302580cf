import os

import pytest

# Without a GPU, Triton can only run in its interpreter, and the flag must be set
# before triton is first imported anywhere in the test process.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.testing._internal (optim_db, the yardstick of tests/optimizer/test_torch_conformance.py)
# imports expecttest for the base class of its TestCase only.  Where the package is
# missing (the GPU machine's image), a stand-in keeps those tests running instead of
# letting their module skip at collection.
try:
    import expecttest  # noqa: F401
except ImportError:
    import sys
    import types
    import unittest

    _expecttest = types.ModuleType("expecttest")
    _expecttest.TestCase = unittest.TestCase
    sys.modules["expecttest"] = _expecttest

# After the flag above: importing the package must not import triton before it is set.
from reptile_fused.batched.graph import CAPTURABLE_BACKENDS  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a folder or file named gpu
            item.add_marker(skip_gpu)


@pytest.fixture(params=CAPTURABLE_BACKENDS)
def capturable_backend(request):
    """Every backend a CUDA graph can record: each capture test runs on each of them."""
    from reptile_fused.backends import available_backends

    if request.param not in available_backends("cuda"):
        pytest.skip(f"backend {request.param!r} is not available on CUDA in this build")
    return request.param
