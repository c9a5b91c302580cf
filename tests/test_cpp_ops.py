"""The C++/CUDA backend against the reference ops: every op, dtype, awkward size and
alignment, property-based cases, opcheck, scalars as tensors, bad input, and the
kernels the built library registered.

Every case runs on the CPU; the ``cuda`` variants are gpu-marked (skipped without a
GPU, run by ``make gpu-check``)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpp_cases import DTYPES, LARGE, OPS, RUNNERS, SIZES, opcheck_samples, run_adam, run_batched, run_sgd
from reptile_fused import reference as ref
from reptile_fused.backends import cpp

BUILT = cpp.unavailable_reason(torch.device("cpu")) is None
NOT_BUILT_OK = os.environ.get("REPTILE_FUSED_NO_EXTENSION", "0") == "1"

needs_ext = pytest.mark.skipif(not BUILT, reason=f"extension not built: {cpp._LOAD_ERROR}")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def dtype_id(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def test_extension_is_built():
    """A missing extension must fail loudly, not skip every other test here.  A
    deliberately pure-Python install (REPTILE_FUSED_NO_EXTENSION=1) is exempt."""
    if NOT_BUILT_OK:
        pytest.skip("REPTILE_FUSED_NO_EXTENSION=1: pure-Python install")
    assert BUILT, cpp.unavailable_reason(torch.device("cpu"))


@needs_ext
def test_cpu_kernel_for_every_op():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"reptile_fused::{op}", "CPU"), op


@needs_ext
def test_cuda_kernel_for_every_op():
    """A build with a CUDA toolkit must have compiled and registered a CUDA kernel
    for every op.  CI builds with nvcc, so CUDA code that does not compile or register
    fails here even without a GPU."""
    info = cpp.build_info() or {}
    from torch.utils.cpp_extension import CUDA_HOME

    toolkit_here = CUDA_HOME is not None and torch.version.cuda is not None
    if not info.get("WITH_CUDA"):
        if toolkit_here and os.environ.get("REPTILE_FUSED_CUDA", "auto") not in ("0", "off", "false", "no"):
            pytest.fail(
                f"a CUDA toolkit is here ({CUDA_HOME}) but the extension was built without CUDA kernels; "
                "rebuild it (pip install --no-build-isolation -e .)"
            )
        pytest.skip(f"extension built without a CUDA toolkit (build info: {info})")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"reptile_fused::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"
    assert cpp.unavailable_reason(torch.device("cuda")) is None


# --------------------------------------------------------------------- op vs reference


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference(op, size, dtype, device):
    RUNNERS[op](size, dtype, device, offset=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("op", OPS)
def test_op_unaligned(op, offset, dtype, device):
    """Buffers starting off 16-byte boundaries (as flat-buffer segments do)."""
    for size in (5, 33, 4099):
        RUNNERS[op](size, dtype, device, offset=offset, seed=size)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", OPS)
def test_op_large(op, dtype, device):
    kw = {"rows": 2} if op == "batched_meta_update_" else {}  # rows are covered above; size is the point here
    RUNNERS[op](LARGE, dtype, device, offset=1, **kw)


def config_id(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items())


SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0),
    dict(momentum=0.0, weight_decay=0.1, maximize=True),
    dict(momentum=0.9, dampening=0.0, first_step=True),
    dict(momentum=0.9, dampening=0.5, weight_decay=0.01, first_step=True, nesterov=True),
    dict(momentum=0.9, dampening=0.0, nesterov=True),
    dict(momentum=0.5, dampening=0.3, weight_decay=0.05, maximize=True),
]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=config_id)
def test_sgd_options(config, dtype, device):
    for size, offset in ((1023, 0), (517, 1)):
        run_sgd(size, dtype, device, offset=offset, **config)


ADAM_CONFIGS = [
    dict(step=1),
    dict(step=1, beta1=0.0),  # the authors' Reptile setting: betas=(0, 0.999)
    dict(step=7, weight_decay=0.1, maximize=True),
    dict(step=2, amsgrad=True),
    dict(step=50, amsgrad=True, weight_decay=0.01, beta1=0.6, beta2=0.9, eps=1e-6),
    dict(step=4, beta1=0.3),  # 1 - beta1 >= 0.5: the other branch of torch's lerp
]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=config_id)
def test_adam_options(config, dtype, device):
    for size, offset in ((1023, 0), (517, 1)):
        run_adam(size, dtype, device, offset=offset, **config)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("write_back", [True, False])
def test_batched_rows(rows, write_back, dtype, device):
    for size, offset in ((1, 0), (17, 0), (4099, 0), (4099, 1), (1024, 3)):
        run_batched(size, dtype, device, rows=rows, offset=offset, write_back=write_back, seed=size)


# --------------------------------------------------------------------- property-based

_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_dtypes = st.sampled_from(DTYPES)
_sizes = st.integers(0, 3000)
_offsets = st.integers(0, 7)


@needs_ext
@_settings
@given(
    size=_sizes,
    offset=_offsets,
    dtype=_dtypes,
    lr=st.floats(1e-4, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    dampening=st.floats(0.0, 0.9),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    first_step=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sgd_property(size, offset, dtype, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                      seed):
    if nesterov and momentum == 0:
        momentum = 0.9
    run_sgd(size, dtype, "cpu", offset=offset, seed=seed, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step)


@needs_ext
@_settings
@given(
    size=_sizes,
    offset=_offsets,
    dtype=_dtypes,
    step=st.integers(1, 10_000),
    lr=st.floats(1e-5, 0.1),
    beta1=st.sampled_from([0.0, 0.5, 0.9]),
    beta2=st.sampled_from([0.9, 0.99, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.01]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adam_property(size, offset, dtype, step, lr, beta1, beta2, weight_decay, amsgrad, maximize, seed):
    run_adam(size, dtype, "cpu", offset=offset, seed=seed, step=step, lr=lr, beta1=beta1, beta2=beta2,
             weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


@needs_ext
@_settings
@given(
    size=_sizes,
    offset=_offsets,
    dtype=_dtypes,
    rows=st.integers(1, 16),
    meta_lr=st.floats(0.0, 1.0),
    write_back=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batched_property(size, offset, dtype, rows, meta_lr, write_back, seed):
    run_batched(size, dtype, "cpu", rows=rows, offset=offset, seed=seed, meta_lr=meta_lr, write_back=write_back)


@needs_ext
@_settings
@given(size=_sizes, offset=_offsets, dtype=_dtypes, op=st.sampled_from(["task_end_", "meta_update_"]),
       seed=st.integers(0, 2**16))
def test_reptile_ops_property(size, offset, dtype, op, seed):
    RUNNERS[op](size, dtype, "cpu", offset=offset, seed=seed)


# --------------------------------------------------------------------- scalars as tensors


def _scalar_tensors(device):
    yield "cpu-f32", lambda v: torch.tensor(v, dtype=torch.float32)
    yield "cpu-f64-1elem", lambda v: torch.tensor([v], dtype=torch.float64)
    yield "dev-f32", lambda v: torch.tensor(v, dtype=torch.float32, device=device)
    yield "dev-bf16", lambda v: torch.tensor(v, dtype=torch.bfloat16, device=device)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_scalars_as_tensors(dtype, device):
    """lr, step, meta_lr and n as 0-dim (or one-element) tensors of several dtypes,
    on the buffers' device or the CPU, give what the reference gives."""
    gen = torch.Generator().manual_seed(5)

    def r(n=129, d=dtype):
        return torch.randn(n, generator=gen).to(d).to(device)

    from cpp_cases import assert_matches

    for label, make in _scalar_tensors(device):
        a = [r(), r(), r()]
        b = [t.clone() for t in a]
        ref.sgd_step_(*a, make(0.25), momentum=0.9)
        cpp.sgd_step_(*b, make(0.25), momentum=0.9)
        for x, y in zip(b, a):
            assert_matches(x, y, f"sgd {label}")

        a = [r(), r(), r(), r().abs(), r().abs()]
        b = [t.clone() for t in a]
        ref.adam_step_(*a, make(6.0), make(0.125), amsgrad=True)
        cpp.adam_step_(*b, make(6.0), make(0.125), amsgrad=True)
        for x, y in zip(b, a):
            assert_matches(x, y, f"adam {label}")

        acc = r(d=torch.float32)
        a = [r(), r(), acc]
        b = [t.clone() for t in a]
        ref.meta_update_(*a, make(0.5), make(3.0))
        cpp.meta_update_(*b, make(0.5), make(3.0))
        for x, y in zip(b, a):
            assert_matches(x, y, f"meta_update {label}")

        a = [r(), r(5 * 129).view(5, 129)]
        b = [t.clone() for t in a]
        ref.batched_meta_update_(*a, make(0.375))
        cpp.batched_meta_update_(*b, make(0.375))
        for x, y in zip(b, a):
            assert_matches(x, y, f"batched {label}")


# --------------------------------------------------------------------- opcheck


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in opcheck_samples(device):
        op = getattr(torch.ops.reptile_fused, name).default
        torch.library.opcheck(op, args)


@needs_ext
def test_ops_trace_under_compile():
    """The fake kernels let torch.compile trace the mutating ops without a graph break."""
    theta = torch.randn(64)
    tasks = torch.randn(3, 64)
    want_theta, want_tasks = theta.clone(), tasks.clone()
    ref.batched_meta_update_(want_theta, want_tasks, 0.5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def meta(theta, tasks):
        torch.ops.reptile_fused.batched_meta_update_(theta, tasks, 0.5, None, True)

    meta(theta, tasks)
    assert torch.equal(theta, want_theta) and torch.equal(tasks, want_tasks)


# --------------------------------------------------------------------- bad input


def _bad_cases():
    f = torch.float32

    def z(n=8, dtype=f):
        return torch.zeros(n, dtype=dtype)

    yield "non-contiguous", lambda m: m.sgd_step_(torch.zeros(16)[::2], z(), None, 0.1)
    yield "2-D param", lambda m: m.sgd_step_(torch.zeros(2, 4), torch.zeros(2, 4), None, 0.1)
    yield "int dtype", lambda m: m.sgd_step_(z(dtype=torch.int32), z(dtype=torch.int32), None, 0.1)
    yield "grad size", lambda m: m.sgd_step_(z(), z(7), None, 0.1)
    yield "grad dtype", lambda m: m.sgd_step_(z(), z(dtype=torch.float64), None, 0.1)
    yield "no momentum buffer", lambda m: m.sgd_step_(z(), z(), None, 0.1, momentum=0.9)
    yield "amsgrad no max", lambda m: m.adam_step_(z(), z(), z(), z(), None, 1, 0.1, amsgrad=True)
    yield "step 0", lambda m: m.adam_step_(z(), z(), z(), z(), None, 0, 0.1)
    yield "step tensor 0", lambda m: m.adam_step_(z(), z(), z(), z(), None, torch.tensor(0.0), 0.1)
    yield "exp_avg dtype", lambda m: m.adam_step_(z(), z(), z(dtype=torch.float16), z(), None, 1, 0.1)
    yield "acc dtype", lambda m: m.task_end_(z(dtype=torch.bfloat16), z(dtype=torch.bfloat16), z(dtype=torch.bfloat16))
    yield "acc size", lambda m: m.task_end_(z(), z(), z(9))
    yield "n 0", lambda m: m.meta_update_(z(), z(), z(), 1.0, 0)
    yield "n tensor -1", lambda m: m.meta_update_(z(), z(), z(), 1.0, torch.tensor(-1.0))
    yield "tasks 0 rows", lambda m: m.batched_meta_update_(z(), torch.zeros(0, 8), 0.5)
    yield "tasks wrong P", lambda m: m.batched_meta_update_(z(), torch.zeros(2, 9), 0.5)
    yield "tasks 1-D", lambda m: m.batched_meta_update_(z(), z(16), 0.5)
    yield "tasks dtype", lambda m: m.batched_meta_update_(z(), torch.zeros(2, 8, dtype=torch.float64), 0.5)


@needs_ext
@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_rejected_like_reference(case):
    """Same exception type and message as the reference, raised before anything is written."""
    _, call = case
    with pytest.raises(Exception) as want:
        call(ref)
    with pytest.raises(type(want.value)) as got:
        call(cpp)
    assert str(got.value) == str(want.value)


@needs_ext
def test_bad_scalar_tensors_rejected():
    # The reference reads tensor scalars with .item() and accepts these; a kernel that
    # reads the scalar on the device needs one floating element on the right device.
    z = torch.zeros(8)
    with pytest.raises(ValueError, match="lr as a tensor must be 0-dim"):
        cpp.sgd_step_(z, z.clone(), None, torch.ones(2))
    with pytest.raises(TypeError, match="lr as a tensor must be floating point"):
        cpp.sgd_step_(z, z.clone(), None, torch.tensor(1))
    with pytest.raises(ValueError, match="meta_lr is on meta"):
        cpp.batched_meta_update_(z, torch.zeros(2, 8), torch.tensor(0.5, device="meta"))


@needs_ext
def test_nothing_half_applied():
    param, grad = torch.ones(8), torch.ones(8)
    with pytest.raises(ValueError):
        cpp.sgd_step_(param, grad, None, 0.1, momentum=0.9)
    assert torch.equal(param, torch.ones(8))
    theta, tasks = torch.ones(8), torch.full((2, 9), 3.0)
    with pytest.raises(ValueError):
        cpp.batched_meta_update_(theta, tasks, 0.5)
    assert torch.equal(theta, torch.ones(8)) and torch.equal(tasks, torch.full((2, 9), 3.0))


@needs_ext
def test_direct_op_call_checks():
    """torch.ops.reptile_fused.* called directly (no Python checks) still refuses
    input that would read or write out of bounds."""
    ops = torch.ops.reptile_fused
    with pytest.raises(RuntimeError, match="grad must be a contiguous buffer of 8 elements"):
        ops.sgd_step_(torch.zeros(8), torch.zeros(4), None, 0.1, None, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum != 0 needs a momentum_buffer"):
        ops.sgd_step_(torch.zeros(8), torch.zeros(8), None, 0.1, None, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="acc must have dtype Float"):
        ops.task_end_(torch.zeros(8, dtype=torch.half), torch.zeros(8, dtype=torch.half), torch.zeros(8, dtype=torch.half))
    with pytest.raises(RuntimeError, match="tasks must be a contiguous"):
        ops.batched_meta_update_(torch.zeros(8), torch.zeros(2, 8).t(), 0.5, None, True)
    with pytest.raises(RuntimeError, match="n .* must be > 0"):
        ops.meta_update_(torch.zeros(8), torch.zeros(8), torch.zeros(8), 1.0, None, 0.0, None)


def test_unavailable_reason_names_how_to_build():
    reason = cpp.unavailable_reason(torch.device("meta"))
    assert reason is not None
    if not BUILT:
        assert "pip install" in reason or "setup.py" in reason


@needs_ext
def test_baseline_cpu_kernels_match_reference():
    """The kernels are compiled twice (baseline x86-64 and AVX2) and picked at run time
    as torch picks its own; this process runs the AVX2 copy on AVX2 machines, so the
    baseline copy is checked in a child process told to avoid AVX2."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = (
        "import torch\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT', torch.backends.cpu.get_cpu_capability()\n"
        "from cpp_cases import DTYPES, RUNNERS\n"
        "for op, run in RUNNERS.items():\n"
        "    for dtype in DTYPES:\n"
        "        for size, offset in ((0, 0), (1, 0), (17, 1), (4099, 3), (65537, 0)):\n"
        "            run(size, dtype, 'cpu', offset=offset, seed=size)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@needs_ext
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="torch's baseline CPU kernels do not fuse multiply-adds; exactness is only promised against AVX2 ones",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=config_id)
def test_sgd_bit_exact_with_torch_cpu(config, dtype):
    """SGD computes each add-with-alpha as the fused multiply-add torch's vectorised
    CPU kernel computes, so ReptileOptimizer's inner SGD equals torch.optim.SGD exactly."""
    gen = torch.Generator().manual_seed(11)
    p, g, b = (torch.randn(70_001, generator=gen, dtype=dtype) for _ in range(3))
    want, got = [p.clone(), g, b.clone()], [p.clone(), g, b.clone()]
    ref.sgd_step_(*want, 0.05, **config)
    cpp.sgd_step_(*got, 0.05, **config)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
