"""Triton kernels for the flat-buffer ops, and the launchers that feed them.

This module imports Triton; only :mod:`reptile_fused.backends.triton.ops` imports it, and only
when Triton is installed.

Every kernel is one 1-D grid over a flat buffer: program ``i`` owns elements
``[i * BLOCK, (i + 1) * BLOCK)``, masked at the tail.  First-order MAML's optional
``update`` buffer is a constexpr flag (``HAS_UPDATE``); without it the pointer is passed
as None, so those variants compile to the code they did before the buffer existed.  The arithmetic follows
:mod:`reptile_fused.reference` operation by operation (same operand order), in the
opmath dtype (float32 for 16-bit buffers), and each output is rounded once on store.

Scalars reach a kernel one of two ways:

* a Python number travels as the int64 bit pattern of its float64 value.  Triton
  passes float arguments as float32, which would round float64 hyperparameters; the
  bit pattern keeps them exact, and the kernel rounds to the opmath dtype exactly as
  torch rounds a Python scalar for a float32 tensor.
* a 0-dim tensor on the buffers' device travels as a pointer and is loaded by every
  program, so a CUDA graph replays with whatever value the tensor holds.

Launch configurations: on a GPU each kernel is autotuned over block size and warp
count, keyed on the buffer length (and dtype, which Triton adds to the key); the
autotuner caches the winner per key, so tuning costs one benchmark per buffer shape
in a process.  Under ``TRITON_INTERPRET=1`` the kernels run with a fixed, small
block instead: the interpreter is slow and timing it means nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

try:  # the interpreter's function type moved between Triton releases; only its identity matters
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old Triton
    _InterpretedFunction = ()

# Block used when the interpreter runs the kernels.  Small, so modest test sizes
# already span several programs.
INTERPRET_BLOCK = 256


# --------------------------------------------------------------------------- helpers


@triton.jit
def _f64_from_bits(bits):
    # The cast to int64 first: Triton types small bit patterns (0.0) as int32.
    return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True)


@triton.jit
def _scalar(bits, ptr, FROM_PTR: tl.constexpr, OPMATH: tl.constexpr):
    if FROM_PTR:
        value = tl.load(ptr).to(OPMATH)
    else:
        value = _f64_from_bits(bits).to(OPMATH)
    return value


@triton.jit
def _scalar_f64(bits, ptr, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        value = tl.load(ptr).to(tl.float64)
    else:
        value = _f64_from_bits(bits)
    return value


@triton.jit
def _div(x, y, OPMATH: tl.constexpr):
    # Triton's float32 `/` is div.full.f32 on NVIDIA GPUs (up to 2 ulp off); torch divides
    # correctly rounded.  div_rn is the IEEE division (float32 only; float64 `/` is already
    # div.rn.f64).
    if OPMATH == tl.float64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


@triton.jit
def _sqrt(x, OPMATH: tl.constexpr):
    # tl.sqrt is an approximation for float32 on NVIDIA GPUs; torch's is correctly rounded.
    if OPMATH == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


# Triton's interpreter converts float32 <-> bfloat16 wrongly (it truncates instead of
# rounding to nearest even, and mangles subnormals), so under the interpreter the
# kernels convert bfloat16 by bit manipulation (BF16_BITS).  GPUs use the hardware
# conversions, which are exact and round to nearest even.


@triton.jit
def _load(ptr, offs, mask, OPMATH: tl.constexpr, BF16_BITS: tl.constexpr):
    """Load and widen to the opmath dtype (exact: every storage dtype fits)."""
    x = tl.load(ptr + offs, mask=mask)
    if BF16_BITS:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(OPMATH)
    return y


@triton.jit
def _rounded(x, ptr, BF16_BITS: tl.constexpr):
    """``x`` rounded to the dtype of the buffer ``ptr`` points into, once (to nearest even)."""
    if BF16_BITS:
        b = x.to(tl.uint32, bitcast=True)
        b = tl.where(x != x, 0x7FC00000, b + 0x7FFF + ((b >> 16) & 1)).to(tl.uint32)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _store(ptr, offs, x, mask, BF16_BITS: tl.constexpr):
    """Round ``x`` to the buffer's dtype once (to nearest even) and store it."""
    tl.store(ptr + offs, _rounded(x, ptr, BF16_BITS), mask=mask)


@triton.jit
def _record_update(update_ptr, param_ptr, offs, new, old, mask, OPMATH: tl.constexpr, BF16_BITS: tl.constexpr):
    """``update <- stored(new) - old`` in opmath (first-order MAML's record of a step).

    ``stored(new)`` is ``new`` rounded to the parameter's dtype as :func:`_store` rounds
    it into ``param_ptr``, widened back (exact); the subtraction is one opmath op.
    ``update`` has the opmath dtype, so its store rounds nothing."""
    if BF16_BITS:
        b = new.to(tl.uint32, bitcast=True)
        b = tl.where(new != new, 0x7FC00000, b + 0x7FFF + ((b >> 16) & 1)).to(tl.uint32)
        stored = (b & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        stored = new.to(param_ptr.dtype.element_ty).to(OPMATH)
    tl.store(update_ptr + offs, stored - old, mask=mask)


@triton.jit
def _block(n_elements, BLOCK: tl.constexpr):
    # int64 offsets: a single buffer may hold more than 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n_elements


# --------------------------------------------------------------------------- kernels


def _kernel(fn):
    """``triton.jit`` for a kernel whose ``*_bits`` arguments carry float64 bit patterns.

    Those are typed int64 and never specialised: Triton would otherwise compile a variant
    for each value class (0 is an int32, a multiple of 16 gets its own divisibility
    variant), and Adam's bias corrections move between classes from step to step."""
    bits = [name for name in inspect.signature(fn).parameters if name.endswith("_bits")]
    for name in bits:
        fn.__annotations__[name] = "tl.int64"
    return triton.jit(do_not_specialize=bits)(fn)



@triton.jit
def _param_and_grad(param_ptr, grad_ptr, offs, mask, weight_decay_bits,
                    HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
                    OPMATH: tl.constexpr, BF16_BITS: tl.constexpr):  # fmt: skip
    """The parameter and the gradient SGD and Adam both start from: sign-flipped for
    ``maximize``, then with L2 weight decay added, as torch.optim does."""
    p = _load(param_ptr, offs, mask, OPMATH, BF16_BITS)
    g = _load(grad_ptr, offs, mask, OPMATH, BF16_BITS)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + _scalar(weight_decay_bits, None, False, OPMATH) * p
    return p, g


@_kernel
def _sgd_kernel(
    param_ptr, grad_ptr, buf_ptr, update_ptr,
    lr_bits, lr_ptr, momentum_bits, one_minus_dampening_bits, weight_decay_bits,
    n_elements,
    LR_FROM_PTR: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr, HAS_UPDATE: tl.constexpr,
    OPMATH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _block(n_elements, BLOCK)
    p, g = _param_and_grad(param_ptr, grad_ptr, offs, mask, weight_decay_bits,
                           HAS_WEIGHT_DECAY, MAXIMIZE, OPMATH, BF16_BITS)  # fmt: skip
    if HAS_MOMENTUM:
        momentum = _scalar(momentum_bits, None, False, OPMATH)
        if FIRST_STEP:
            buf = g
        else:
            buf = _load(buf_ptr, offs, mask, OPMATH, BF16_BITS) * momentum
            buf = buf + _scalar(one_minus_dampening_bits, None, False, OPMATH) * g
        _store(buf_ptr, offs, buf, mask, BF16_BITS)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    neg_lr = -_scalar(lr_bits, lr_ptr, LR_FROM_PTR, OPMATH)
    new = p + neg_lr * g
    _store(param_ptr, offs, new, mask, BF16_BITS)
    if HAS_UPDATE:
        _record_update(update_ptr, param_ptr, offs, new, p, mask, OPMATH, BF16_BITS)


@_kernel
def _adam_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, update_ptr,
    lr_bits, lr_ptr, step_ptr,
    bias_correction1_bits, bias_correction2_sqrt_bits,
    log_beta1_bits, log_beta2_bits,
    lerp_weight_bits, beta2_bits, one_minus_beta2_bits, eps_bits, weight_decay_bits,
    n_elements,
    LR_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr, LERP_WEIGHT_SMALL: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_UPDATE: tl.constexpr,
    OPMATH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _block(n_elements, BLOCK)
    p, g = _param_and_grad(param_ptr, grad_ptr, offs, mask, weight_decay_bits,
                           HAS_WEIGHT_DECAY, MAXIMIZE, OPMATH, BF16_BITS)  # fmt: skip

    # torch's lerp picks its formula by the weight's size; follow the same branch.
    m = _load(exp_avg_ptr, offs, mask, OPMATH, BF16_BITS)
    w = _scalar(lerp_weight_bits, None, False, OPMATH)
    if LERP_WEIGHT_SMALL:
        m = m + w * (g - m)
    else:
        m = g - (g - m) * (1.0 - w)
    v = _load(exp_avg_sq_ptr, offs, mask, OPMATH, BF16_BITS) * _scalar(beta2_bits, None, False, OPMATH)
    v = v + (_scalar(one_minus_beta2_bits, None, False, OPMATH) * g) * g

    # Bias corrections in float64, as the reference computes them on the host, then
    # rounded to opmath once.  With a tensor step they are computed here per program.
    if STEP_FROM_PTR:
        step = tl.load(step_ptr).to(tl.float64)
        bias_correction1 = 1.0 - tl.exp(step * _f64_from_bits(log_beta1_bits))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * _f64_from_bits(log_beta2_bits)))
    else:
        bias_correction1 = _f64_from_bits(bias_correction1_bits)
        bias_correction2_sqrt = _f64_from_bits(bias_correction2_sqrt_bits)
    lr = _scalar_f64(lr_bits, lr_ptr, LR_FROM_PTR)
    neg_step_size = (-_div(lr, bias_correction1, tl.float64)).to(OPMATH)
    bc2_sqrt = bias_correction2_sqrt.to(OPMATH)
    eps = _scalar(eps_bits, None, False, OPMATH)

    if AMSGRAD:
        vmax = tl.maximum(
            _load(max_exp_avg_sq_ptr, offs, mask, OPMATH, BF16_BITS), v, propagate_nan=tl.PropagateNan.ALL
        )
        _store(max_exp_avg_sq_ptr, offs, vmax, mask, BF16_BITS)
        denom = _div(_sqrt(vmax, OPMATH), bc2_sqrt, OPMATH) + eps
    else:
        denom = _div(_sqrt(v, OPMATH), bc2_sqrt, OPMATH) + eps
    # addcdiv computes value * t1 / t2 left to right.
    new = p + _div(neg_step_size * m, denom, OPMATH)
    _store(exp_avg_ptr, offs, m, mask, BF16_BITS)
    _store(exp_avg_sq_ptr, offs, v, mask, BF16_BITS)
    _store(param_ptr, offs, new, mask, BF16_BITS)
    if HAS_UPDATE:
        _record_update(update_ptr, param_ptr, offs, new, p, mask, OPMATH, BF16_BITS)


@triton.jit
def _task_end_kernel(
    param_ptr, anchor_ptr, acc_ptr, update_ptr, n_elements,
    HAS_UPDATE: tl.constexpr, OPMATH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _block(n_elements, BLOCK)
    if HAS_UPDATE:
        # First-order MAML: the task ended at anchor + update (rounded in opmath before it
        # is accumulated); the parameter is not read.
        p = _load(anchor_ptr, offs, mask, OPMATH, BF16_BITS) + tl.load(update_ptr + offs, mask=mask)
    else:
        # acc has the opmath dtype, so widening the parameter to it is exact.
        p = _load(param_ptr, offs, mask, OPMATH, BF16_BITS)
    tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=mask) + p, mask=mask)
    tl.store(param_ptr + offs, tl.load(anchor_ptr + offs, mask=mask), mask=mask)


@_kernel
def _meta_update_kernel(
    param_ptr, anchor_ptr, acc_ptr,
    meta_lr_bits, meta_lr_ptr, n_bits, n_ptr,
    n_elements,
    META_LR_FROM_PTR: tl.constexpr, N_FROM_PTR: tl.constexpr,
    OPMATH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _block(n_elements, BLOCK)
    a = _load(anchor_ptr, offs, mask, OPMATH, BF16_BITS)
    acc = tl.load(acc_ptr + offs, mask=mask)
    meta_lr = _scalar(meta_lr_bits, meta_lr_ptr, META_LR_FROM_PTR, OPMATH)
    n = _scalar(n_bits, n_ptr, N_FROM_PTR, OPMATH)
    _store(param_ptr, offs, a + meta_lr * (_div(acc, n, OPMATH) - a), mask, BF16_BITS)
    tl.store(acc_ptr + offs, tl.zeros_like(acc), mask=mask)


@_kernel
def _batched_meta_update_kernel(
    theta_ptr, tasks_ptr, updates_ptr,
    meta_lr_bits, meta_lr_ptr,
    n_elements, n_rows,
    META_LR_FROM_PTR: tl.constexpr, WRITE_BACK: tl.constexpr, HAS_UPDATES: tl.constexpr,
    OPMATH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask = _block(n_elements, BLOCK)
    # Rows summed in order, row 0 first, as the reference does; the row pointer is
    # advanced rather than recomputed so n_rows * n_elements may exceed 2**31.
    if HAS_UPDATES:
        # First-order MAML: row i counts as theta + updates[i] (rounded in opmath before
        # it is summed); tasks is not read.  updates has the opmath dtype.
        t = _load(theta_ptr, offs, mask, OPMATH, BF16_BITS)
        row_ptr = updates_ptr + offs
        total = t + tl.load(row_ptr, mask=mask)
        for _ in range(1, n_rows):
            row_ptr += n_elements
            total += t + tl.load(row_ptr, mask=mask)
    else:
        row_ptr = tasks_ptr + offs
        total = _load(row_ptr, 0, mask, OPMATH, BF16_BITS)
        for _ in range(1, n_rows):
            row_ptr += n_elements
            total += _load(row_ptr, 0, mask, OPMATH, BF16_BITS)
        t = _load(theta_ptr, offs, mask, OPMATH, BF16_BITS)
    meta_lr = _scalar(meta_lr_bits, meta_lr_ptr, META_LR_FROM_PTR, OPMATH)
    # (tl.cast, not .to: Triton passes an n_rows of 1 as a constant.)
    new = t + meta_lr * (_div(total, tl.cast(n_rows, OPMATH), OPMATH) - t)
    _store(theta_ptr, offs, new, mask, BF16_BITS)
    if WRITE_BACK:
        # The rows get what _store just rounded into theta, rounded the same way, not a
        # reload of theta: on an H200 a reload right after the store read stale values
        # for unaligned theta (the rows then differed from theta).
        stored = _rounded(new, theta_ptr, BF16_BITS)
        row_ptr = tasks_ptr + offs
        for _ in range(0, n_rows):
            tl.store(row_ptr, stored, mask=mask)
            row_ptr += n_elements


# --------------------------------------------------------------------------- autotuning

# Block sizes / warps worth trying for a memory-bound elementwise pass; large blocks
# amortise the per-program scalar work, more warps keep enough loads in flight.  At
# most 16 elements per thread and 8 warps: compiled for sm_90 without a GPU
# (tests/gpu_ready/test_triton_aot.py), 32 elements per thread (4096/4, 8192/8) spill
# to local memory for float64 Adam and for unaligned buffers, and 8192/16 caps the
# registers at 128 per thread, which spills float64 Adam too.
_TUNE_SPACE = ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
# REPTILE_FUSED_TRITON_TUNE (read at import) narrows the search for `make gpu-check`,
# where a cold Triton cache must cost seconds, not minutes (every kernel variant is
# compiled once per configuration the pruning keeps):
#   quick   two configurations (its benchmarks still tune);
#   single  one configuration that every dtype and variant can use (1024 elements on 4
#           warps: at most 8 per thread, below every pruning limit), so the autotuner
#           never benchmarks (its GPU test stages).
_QUICK_TUNE_SPACE = ((1024, 4), (4096, 8))
_SINGLE_TUNE_SPACE = ((1024, 4),)
TUNE_SPACES = {"": _TUNE_SPACE, "full": _TUNE_SPACE, "quick": _QUICK_TUNE_SPACE, "single": _SINGLE_TUNE_SPACE}


def _tune_space():
    name = os.environ.get("REPTILE_FUSED_TRITON_TUNE", "").strip().lower()
    if name not in TUNE_SPACES:
        raise ValueError(f"REPTILE_FUSED_TRITON_TUNE={name!r}: expected one of full, quick, single")
    return TUNE_SPACES[name]


TUNE_SPACE = _tune_space()


def _configs() -> list:
    return [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in TUNE_SPACE]


def _prune_for_size(configs, named_args, **kwargs):
    """Blocks much larger than the buffer only waste lanes: keep those that fit.  Float64
    buffers keep at most 8 elements per thread: with 16, Adam spills on unaligned buffers.
    So does Adam recording its update (an ``update_ptr`` given) on unaligned float32
    buffers, and on 16-bit ones it reaches the 255-register cap: at most 8 there too."""
    n = named_args["n_elements"]
    limit = max(1024, triton.next_power_of_2(max(int(n), 1)))
    kept = [c for c in configs if c.kwargs["BLOCK"] <= limit]
    first = next((v for v in named_args.values() if isinstance(v, Tensor)), None)
    adam_update = named_args.get("exp_avg_ptr") is not None and named_args.get("update_ptr") is not None
    if first is not None and first.dtype == torch.float64 or adam_update:
        kept = [c for c in kept if c.kwargs["BLOCK"] <= 8 * 32 * c.num_warps]
    return kept or configs[:1]


def _autotuned(kernel, mutated: list[str], key: list[str]):
    return triton.autotune(
        configs=_configs(),
        key=key,
        prune_configs_by={"early_config_prune": _prune_for_size},
        # Tuning launches the kernel repeatedly; these in-place kernels would apply
        # the update once per trial without restoring their outputs.
        restore_value=mutated,
    )(kernel)


_sgd_tuned = _autotuned(_sgd_kernel, ["param_ptr", "buf_ptr"], ["n_elements"])
# HAS_UPDATE in Adam's key: the pruning above depends on it, so a configuration tuned
# without an update buffer must not be reused with one.
_adam_tuned = _autotuned(
    _adam_kernel, ["param_ptr", "exp_avg_ptr", "exp_avg_sq_ptr", "max_exp_avg_sq_ptr"], ["n_elements", "HAS_UPDATE"]
)
_task_end_tuned = _autotuned(_task_end_kernel, ["param_ptr", "acc_ptr"], ["n_elements"])
_meta_update_tuned = _autotuned(_meta_update_kernel, ["param_ptr", "acc_ptr"], ["n_elements"])
_batched_tuned = _autotuned(_batched_meta_update_kernel, ["theta_ptr", "tasks_ptr"], ["n_elements", "n_rows"])

AUTOTUNED = {
    "sgd_step_": _sgd_tuned,
    "adam_step_": _adam_tuned,
    "task_end_": _task_end_tuned,
    "meta_update_": _meta_update_tuned,
    "batched_meta_update_": _batched_tuned,
}


def interpreting() -> bool:
    """Whether these kernels run in Triton's interpreter (decided when Triton decorated them)."""
    return isinstance(_sgd_kernel, _InterpretedFunction) if _InterpretedFunction else False


def _warps_for(block: int) -> int:
    return max(1, min(16, block // 256))


def _on_device(t: Tensor):
    """Make ``t``'s GPU the current one for the launch: Triton launches on the current
    device (and its current stream), whatever device the pointers are on."""
    if t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _launch(raw, tuned, n_elements: int, block: int | None, args: tuple, consts: dict) -> None:
    """Launch over ``n_elements``: fixed ``block`` if given (or under the interpreter), else autotuned."""
    if interpreting():
        # wrap_triton rejects interpreted kernels on older torch, and there is
        # nothing for torch.compile to trace under the interpreter anyway.
        block = block or INTERPRET_BLOCK
        raw[(triton.cdiv(n_elements, block),)](*args, **consts, BLOCK=block)
        return
    with _on_device(args[0]):
        if block is not None:
            wrap_triton(raw)[(triton.cdiv(n_elements, block),)](*args, **consts, BLOCK=block, num_warps=_warps_for(block))
        else:
            wrap_triton(tuned)[lambda meta: (triton.cdiv(n_elements, meta["BLOCK"]),)](*args, **consts)


# --------------------------------------------------------------------------- launchers
#
# Arguments are already validated (reptile_fused.backends.triton does that).  A
# scalar arrives as ``(value, tensor)``: the tensor, if not None, lives on the
# buffers' device and wins; the float is used otherwise.


def f64_bits(x: float) -> int:
    """The IEEE-754 float64 bit pattern of ``x`` as a signed int64."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _round_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _unused(param: Tensor) -> Tensor:
    """Stand-in for an absent optional buffer the kernel will not touch.

    Not None: many Triton releases' ``restore_value`` hooks call ``.clone()`` on every
    listed argument, None included.  An absent ``update`` buffer is passed as None: no
    kernel lists it for restoring (it is only read, or written from restored inputs,
    the same on every tuning trial), and None adds no kernel argument.
    """
    return param


def _opmath(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _bf16_bits(t: Tensor) -> bool:
    return t.dtype == torch.bfloat16 and interpreting()


def sgd(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    lr: float,
    lr_t: Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    update: Tensor | None = None,
    block: int | None = None,
) -> None:
    n = param.numel()
    if n == 0:
        return
    has_momentum = momentum != 0
    args = (
        param, grad, momentum_buffer if has_momentum else _unused(param), update,
        f64_bits(lr), lr_t, f64_bits(momentum), f64_bits(1 - dampening), f64_bits(weight_decay),
        n,
    )  # fmt: skip
    consts = dict(
        LR_FROM_PTR=lr_t is not None,
        HAS_MOMENTUM=has_momentum,
        HAS_WEIGHT_DECAY=weight_decay != 0,
        MAXIMIZE=bool(maximize),
        # Without momentum the flags below change nothing: fixed, so they make no new variant.
        NESTEROV=bool(nesterov) and has_momentum,
        FIRST_STEP=bool(first_step) and has_momentum,
        HAS_UPDATE=update is not None,
        OPMATH=_opmath(param),
        BF16_BITS=_bf16_bits(param),
    )
    _launch(_sgd_kernel, _sgd_tuned, n, block, args, consts)


def adam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: float,
    step_t: Tensor | None,
    lr: float,
    lr_t: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    update: Tensor | None = None,
    fused: bool = False,
    spans: list[int] | None = None,
    block: int | None = None,
) -> None:
    # fused/spans select torch's fused CPU arithmetic (a correctly rounded square root,
    # each tensor's scalar tail); on the GPU this kernel's square root is correctly
    # rounded already and its contract is torch's operation order within a few ulp, so
    # both arithmetics run the same kernel.
    del fused, spans
    n = param.numel()
    if n == 0:
        return
    if step_t is None:
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    else:  # computed in the kernel from the step tensor
        bias_correction1 = bias_correction2_sqrt = 1.0
    # log(0) = -inf gives beta**step = 0 in the kernel, as Python's 0.0**step does.
    log_beta1 = math.log(beta1) if beta1 > 0 else -math.inf
    log_beta2 = math.log(beta2) if beta2 > 0 else -math.inf
    lerp_weight = 1 - beta1
    opmath = _opmath(param)
    rounded_weight = lerp_weight if opmath == tl.float64 else _round_f32(lerp_weight)
    args = (
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else _unused(param), update,
        f64_bits(lr), lr_t, step_t,
        f64_bits(bias_correction1), f64_bits(bias_correction2_sqrt),
        f64_bits(log_beta1), f64_bits(log_beta2),
        f64_bits(lerp_weight), f64_bits(beta2), f64_bits(1 - beta2), f64_bits(eps), f64_bits(weight_decay),
        n,
    )  # fmt: skip
    consts = dict(
        LR_FROM_PTR=lr_t is not None,
        STEP_FROM_PTR=step_t is not None,
        LERP_WEIGHT_SMALL=abs(rounded_weight) < 0.5,
        HAS_WEIGHT_DECAY=weight_decay != 0,
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        HAS_UPDATE=update is not None,
        OPMATH=opmath,
        BF16_BITS=_bf16_bits(param),
    )
    _launch(_adam_kernel, _adam_tuned, n, block, args, consts)


def task_end(param: Tensor, anchor: Tensor, acc: Tensor, update: Tensor | None = None, block: int | None = None) -> None:
    n = param.numel()
    if n == 0:
        return
    consts = dict(HAS_UPDATE=update is not None, OPMATH=_opmath(param), BF16_BITS=_bf16_bits(param))
    _launch(_task_end_kernel, _task_end_tuned, n, block, (param, anchor, acc, update, n), consts)


def meta_update(
    param: Tensor,
    anchor: Tensor,
    acc: Tensor,
    meta_lr: float,
    meta_lr_t: Tensor | None,
    n_tasks: float,
    n_tasks_t: Tensor | None,
    block: int | None = None,
) -> None:
    n = param.numel()
    if n == 0:
        return
    args = (param, anchor, acc, f64_bits(meta_lr), meta_lr_t, f64_bits(n_tasks), n_tasks_t, n)
    consts = dict(
        META_LR_FROM_PTR=meta_lr_t is not None,
        N_FROM_PTR=n_tasks_t is not None,
        OPMATH=_opmath(param),
        BF16_BITS=_bf16_bits(param),
    )
    _launch(_meta_update_kernel, _meta_update_tuned, n, block, args, consts)


def batched_meta_update(
    theta: Tensor,
    tasks: Tensor,
    meta_lr: float,
    meta_lr_t: Tensor | None,
    write_back: bool,
    updates: Tensor | None = None,
    block: int | None = None,
) -> None:
    n = theta.numel()
    if n == 0:
        return
    args = (theta, tasks, updates, f64_bits(meta_lr), meta_lr_t, n, tasks.shape[0])
    consts = dict(
        META_LR_FROM_PTR=meta_lr_t is not None,
        WRITE_BACK=bool(write_back),
        HAS_UPDATES=updates is not None,
        OPMATH=_opmath(theta),
        BF16_BITS=_bf16_bits(theta),
    )
    _launch(_batched_meta_update_kernel, _batched_tuned, n, block, args, consts)
