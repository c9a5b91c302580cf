"""Comparison helpers for the Triton backend tests: the numerics contract in ulps."""

from __future__ import annotations

import torch
from torch import Tensor

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def spacing(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The gap between ``|x|`` and the next larger ``dtype`` value, as float64."""
    bits = MANTISSA_BITS[dtype]
    exponent = torch.frexp(x.double().abs()).exponent  # |x| = m * 2**e, m in [0.5, 1)
    gap = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - bits)
    subnormal_gap = torch.finfo(dtype).smallest_normal * 2.0**-bits
    return gap.clamp_min(subnormal_gap)


def assert_ulp_close(out: Tensor, ref: Tensor, *, ulps: float, atol: float = 0.0, what: str = "") -> None:
    """``out`` equals ``ref`` within ``ulps`` units in the last place of their dtype (plus ``atol``).

    NaNs must sit in the same places.
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    o, r = out.double(), ref.double()
    nan_o, nan_r = o.isnan(), r.isnan()
    assert torch.equal(nan_o, nan_r), f"{what}: NaNs differ"
    o, r = o[~nan_o], r[~nan_r]
    same_inf = (o == r) & o.isinf()
    diff = (o - r).abs()
    tol = ulps * torch.maximum(spacing(o, out.dtype), spacing(r, out.dtype)) + atol
    bad = ~same_inf & ~(diff <= tol)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off by more than {ulps} ulp (+{atol}); "
            f"first: got {o[i].item()!r}, expected {r[i].item()!r}"
        )


def assert_contract(out: Tensor, ref: Tensor, what: str = "") -> None:
    """The numerics contract: 16-bit within 1 ulp of the reference (and almost always
    bit-equal, which a wrong rounding mode would break); float32/float64 to rounding."""
    if out.dtype in (torch.float16, torch.bfloat16):
        # Both sides compute in float32 and round once; a float32-level difference
        # near a rounding boundary can flip that rounding by one ulp, rarely.
        assert_ulp_close(out, ref, ulps=1, atol=1e-6, what=what)
        if out.numel() >= 16:
            exact = (out.double() == ref.double()) | (out.isnan() & ref.isnan())
            assert exact.float().mean().item() >= 0.98, f"{what}: too few bit-equal elements ({exact.float().mean():.3f})"
    else:
        # Operand order matches the reference; contraction into FMAs may still differ
        # by an ulp per step, and a cancellation turns that into an absolute error.
        eps = torch.finfo(out.dtype).eps
        assert_ulp_close(out, ref, ulps=4, atol=8 * eps, what=what)
