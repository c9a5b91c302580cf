"""What only the Triton backend has: its place behind the backend seam, its ops
registered for torch.compile, and the interpreter's grid (the sizes tests/ops/ gives it
span several programs).  Its results against the reference are in tests/ops/; the
compiled kernels, autotuning and CUDA graphs in test_triton_gpu.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ops.cases import OPS, SIZES  # noqa: E402
from reptile_fused.backends import triton as T  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    T.unavailable_reason(DEVICE) is not None, reason=f"triton backend unavailable: {T.unavailable_reason(DEVICE)}"
)


def test_sizes_span_several_programs():
    """Guards the claim that Triton's sizes exercise multi-program grids and masked tails under the interpreter."""
    from reptile_fused.backends.triton import kernels as K

    if K.interpreting():
        largest = max(SIZES["triton"])
        assert largest > 4 * K.INTERPRET_BLOCK and largest % K.INTERPRET_BLOCK != 0


def test_backend_seam():
    from reptile_fused.backends import available_backends, get_backend

    assert get_backend("triton", DEVICE) is T
    if DEVICE.type == "cpu":
        # The interpreter is a testing tool: "auto" must never pick it.
        assert get_backend("auto", "cpu").__name__ != T.__name__
        assert "triton" in available_backends("cpu")


def test_ops_registered_for_torch_compile():
    for name in OPS:
        assert hasattr(torch.ops.reptile_fused_triton, name)
