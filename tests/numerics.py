"""The numerics contract of docs/numerics.md (and of ``reptile_fused/reference.py``'s
docstring), encoded once for every backend, plus the looser bound a whole training
trajectory is held to.

* float32/float64: torch's own arithmetic, so a fused kernel may differ from the
  reference only by rounding: a few ulp, plus a few eps absolute where values cancel.
* float16/bfloat16: read once into float32 ("opmath", taken from the library, not
  redefined here), float32 arithmetic, one rounding on store: within one ulp of the
  storage dtype of the reference, and almost always bit-equal (a wrong rounding mode
  would break that).

A bound is ``|actual - expected| <= ulps * ulp(expected) + rtol * |expected| + atol``
(NaNs in the same places, infinities equal).  ``CONTRACT`` is the bound every backend
meets; ``BACKEND_BOUNDS`` is where a backend legitimately needs a looser one, each entry
with its reason.  The helpers follow Liger-Kernel's ``assert_verbose_allclose``: a
failure names the output, the dtype, how many elements are off and the first of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reptile_fused._validate import SUPPORTED_DTYPES as DTYPES
from reptile_fused._validate import opmath_dtype as opmath

__all__ = [
    "DTYPES",
    "opmath",
    "dtype_id",
    "Bound",
    "CONTRACT",
    "BACKEND_BOUNDS",
    "TRAJECTORY",
    "contract_bound",
    "spacing",
    "assert_within",
    "assert_contract",
    "assert_trajectory_close",
]

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def dtype_id(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: the test id of a dtype parameter."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Bound:
    """``|actual - expected| <= ulps * ulp(expected) + rtol * |expected| + atol``; at least
    ``min_bit_equal`` of the elements bit-equal (checked from 16 elements on, one
    element always forgiven)."""

    ulps: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    min_bit_equal: float = 0.0


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# The contract every backend meets on every op output.
CONTRACT = {
    # Operand order matches the reference; contraction into fused multiply-adds may
    # still differ by an ulp per step, and a cancellation turns that into an absolute
    # error of a few eps of the O(1) operands.
    torch.float32: Bound(ulps=4, atol=4 * _eps(torch.float32)),
    torch.float64: Bound(ulps=4, atol=4 * _eps(torch.float64)),
    # Both sides compute in float32 and round once; a float32-level difference near a
    # rounding boundary can flip that rounding by one ulp, rarely (hence the bit-equal
    # share), and a value that cancels to near zero keeps a float32-rounding slack.
    torch.float16: Bound(ulps=1, atol=1e-6, min_bit_equal=0.98),
    torch.bfloat16: Bound(ulps=1, atol=1e-6, min_bit_equal=0.98),
}

# (backend, dtype) -> the looser bound that backend needs, and why.  Empty while
# every backend meets CONTRACT; an entry here is the only way to loosen a bound.
BACKEND_BOUNDS: dict[tuple[str, torch.dtype], Bound] = {}


def contract_bound(dtype: torch.dtype, backend: str | None = None) -> Bound:
    return BACKEND_BOUNDS.get((backend, dtype), CONTRACT[dtype])


# A whole ReptileOptimizer run (several meta-iterations of inner steps) against the
# reference's: every op is within the contract, but the gradients then see those
# weights, so differences compound a little (a few ulp, a 16-bit weight included).
TRAJECTORY = {
    torch.float32: Bound(ulps=8, atol=1e-6),
    torch.float64: Bound(rtol=1e-12, atol=1e-12),
    torch.bfloat16: Bound(ulps=2, atol=1e-6),
}


def spacing(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The gap between ``|x|`` and the next larger ``dtype`` value (one ulp), as float64."""
    bits = MANTISSA_BITS[dtype]
    exponent = torch.frexp(x.double().abs()).exponent  # |x| = m * 2**e, m in [0.5, 1)
    gap = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - bits)
    subnormal_gap = torch.finfo(dtype).smallest_normal * 2.0**-bits
    return gap.clamp_min(subnormal_gap)


def assert_within(actual: Tensor, expected: Tensor, bound: Bound, name: str = "") -> None:
    """``actual`` equals ``expected`` within ``bound``; NaNs must sit in the same places."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{name}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    )
    if actual.numel() == 0:
        return
    a = actual.detach().cpu().reshape(-1).double()
    e = expected.detach().cpu().reshape(-1).double()
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs"
    exact = (a == e) | nan_a
    if bound.min_bit_equal and a.numel() >= 16:
        # A share says little about a few dozen elements: one flipped rounding is always
        # forgiven (a wrong rounding mode flips a quarter or more of them).
        off = int((~exact).sum())
        allowed = max(1, int((1 - bound.min_bit_equal) * a.numel()))
        assert off <= allowed, (
            f"{name} ({actual.dtype}): {off} of {a.numel()} elements not bit-equal; at most {allowed} may differ"
        )
    tol = bound.ulps * spacing(e, actual.dtype) + bound.rtol * e.abs() + bound.atol
    err = (a - e).abs()
    bad = ~exact & ~(err <= tol)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name} ({actual.dtype}, {int(bad.sum())} of {a.numel()} off by more than {bound}): at {i} got "
            f"{a[i].item()!r}, expected {e[i].item()!r}, tolerance {tol[i].item():.3g}"
        )


def assert_contract(actual: Tensor, expected: Tensor, name: str = "", backend: str | None = None) -> None:
    """One op output of ``backend`` against the reference's: the numerics contract."""
    assert_within(actual, expected, contract_bound(actual.dtype, backend), name)


def assert_trajectory_close(actual: Tensor, expected: Tensor, name: str = "") -> None:
    """A parameter after a ReptileOptimizer run against the reference run's."""
    assert_within(actual, expected, TRAJECTORY[actual.dtype], name)
