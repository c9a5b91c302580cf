"""What only the C++/CUDA backend has: the built library and its registered kernels,
opcheck and torch.compile tracing of its dispatcher ops, the checks of a direct
``torch.ops.reptile_fused`` call, the baseline (non-AVX2) CPU kernels, and bit-exactness
with torch.optim.SGD.  Its results against the reference are in tests/ops/."""

from __future__ import annotations

import os

import pytest
import torch

from numerics import dtype_id, opmath
from ops.cases import OPS, SGD_CONFIGS, config_id
from reptile_fused import reference as ref
from reptile_fused.backends import cpp

BUILT = cpp.unavailable_reason(torch.device("cpu")) is None
NOT_BUILT_OK = os.environ.get("REPTILE_FUSED_NO_EXTENSION", "0") == "1"

needs_ext = pytest.mark.skipif(not BUILT, reason=f"extension not built: {cpp._LOAD_ERROR}")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


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


def test_unavailable_reason_names_how_to_build():
    reason = cpp.unavailable_reason(torch.device("meta"))
    assert reason is not None
    if not BUILT:
        assert "pip install" in reason or "setup.py" in reason


# --------------------------------------------------------------------- opcheck, torch.compile


def opcheck_samples(device: str):
    """(op name, args) for torch.library.opcheck: each op with number and tensor scalars."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        # bfloat16 (16-bit storage, float32 accumulator) needs one sample per op only.
        n = 37

        def r(d=dtype):
            return torch.randn(n, generator=gen).to(d).to(device)

        def rows(k, d=dtype):
            return torch.randn(k, n, generator=gen).to(d).to(device)

        lr_t = torch.tensor(0.05, device=device)
        om = opmath(dtype)
        out += [
            ("sgd_step_", (r(), r(), r(), 0.1, None, 0.9, 0.0, 0.0, False, False, False, None)),
            ("sgd_step_", (r(), r(), r(), 0.0, lr_t, 0.9, 0.1, 0.01, True, True, False, r(om))),
            ("sgd_step_", (r(), r(), None, 0.1, None, 0.0, 0.0, 0.0, False, False, False, None)),
            ("adam_step_", (r(), r(), r(), r().abs(), None, 2.0, None, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, False, False,
                            None, False, None)),
            (
                "adam_step_",
                (r(), r(), r(), r().abs(), r().abs(), 0.0, torch.tensor(3.0, device=device), 0.0, lr_t,
                 0.9, 0.99, 1e-8, 0.01, True, True, r(om), True, [0, 17, 20, 13]),
            ),
            ("task_end_", (r(), r(), r(om), None)),
            ("task_end_", (r(), r(), r(om), r(om))),
            ("meta_update_", (r(), r(), r(om), 0.5, None, 4.0, None)),
            (
                "meta_update_",
                (r(), r(), r(om), 0.0, lr_t, 0.0, torch.tensor(2.0, device=device)),
            ),
            ("batched_meta_update_", (r(), rows(3), 0.5, None, True, None)),
            ("batched_meta_update_", (r(), rows(2), 0.0, lr_t, False, None)),
            ("batched_meta_update_", (r(), rows(2), 0.5, None, True, rows(2, om))),
        ]
    # 16-bit: one sample per op, and one more where the last optional argument (the update; Adam's spans) is given.
    seen: set[tuple[str, bool]] = set()
    keep = []
    for i, (name, args) in enumerate(out):
        key = (name, args[-1] is not None)
        if i < len(out) // 2 or key not in seen:
            keep.append((name, args))
            if i >= len(out) // 2:
                seen.add(key)
    return keep


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
        torch.ops.reptile_fused.batched_meta_update_(theta, tasks, 0.5, None, True, None)

    meta(theta, tasks)
    assert torch.equal(theta, want_theta) and torch.equal(tasks, want_tasks)


# --------------------------------------------------------------------- direct calls, CPU kernels


@needs_ext
def test_direct_op_call_checks():
    """torch.ops.reptile_fused.* called directly (no Python checks) still refuses
    input that would read or write out of bounds."""
    ops = torch.ops.reptile_fused
    with pytest.raises(RuntimeError, match="grad must be a contiguous buffer of 8 elements"):
        ops.sgd_step_(torch.zeros(8), torch.zeros(4), None, 0.1, None, 0.0, 0.0, 0.0, False, False, False, None)
    with pytest.raises(RuntimeError, match="momentum != 0 needs a momentum_buffer"):
        ops.sgd_step_(torch.zeros(8), torch.zeros(8), None, 0.1, None, 0.9, 0.0, 0.0, False, False, False, None)
    with pytest.raises(RuntimeError, match="acc must have dtype Float"):
        ops.task_end_(torch.zeros(8, dtype=torch.half), torch.zeros(8, dtype=torch.half), torch.zeros(8, dtype=torch.half), None)
    with pytest.raises(RuntimeError, match="tasks must be a contiguous"):
        ops.batched_meta_update_(torch.zeros(8), torch.zeros(2, 8).t(), 0.5, None, True, None)
    with pytest.raises(RuntimeError, match="n .* must be > 0"):
        ops.meta_update_(torch.zeros(8), torch.zeros(8), torch.zeros(8), 1.0, None, 0.0, None)


@needs_ext
def test_direct_op_call_checks_update():
    """First-order MAML's update buffers, checked by the library too: the opmath dtype,
    the parameter's size, contiguous, never the parameter buffer itself."""
    ops = torch.ops.reptile_fused
    half, p = torch.zeros(8, dtype=torch.half), torch.zeros(8)
    sgd = (0.1, None, 0.0, 0.0, 0.0, False, False, False)
    adam = (1.0, None, 0.1, None, 0.9, 0.999, 1e-8, 0.0, False, False)
    with pytest.raises(RuntimeError, match="update must have dtype Float"):
        ops.sgd_step_(half, half.clone(), None, *sgd, half.clone())
    with pytest.raises(RuntimeError, match="update must be a contiguous buffer of 8 elements"):
        ops.sgd_step_(p, p.clone(), None, *sgd, torch.zeros(16)[::2])
    with pytest.raises(RuntimeError, match="update must be a buffer of its own"):
        ops.sgd_step_(p, p.clone(), None, *sgd, p)
    with pytest.raises(RuntimeError, match="update must be a contiguous buffer of 8 elements"):
        ops.adam_step_(p, p.clone(), p.clone(), p.clone(), None, *adam, torch.zeros(7), False, None)
    with pytest.raises(RuntimeError, match="update must have dtype Double"):
        ops.task_end_(p.double(), p.double(), p.double(), p.clone())
    with pytest.raises(RuntimeError, match="updates must be a contiguous buffer of the tasks' shape"):
        ops.batched_meta_update_(p, torch.zeros(2, 8), 0.5, None, True, torch.zeros(8, 2).t())
    with pytest.raises(RuntimeError, match="updates must have dtype Float"):
        ops.batched_meta_update_(half, torch.zeros(2, 8, dtype=torch.half), 0.5, None, True,
                                 torch.zeros(2, 8, dtype=torch.half))


@needs_ext
def test_direct_op_call_checks_spans():
    """Adam's spans, checked by the library too before it writes: a span outside the buffer
    or out of order would step memory that is not the buffer's."""
    ops = torch.ops.reptile_fused
    p = torch.zeros(8)
    adam = (1.0, None, 0.1, None, 0.9, 0.999, 1e-8, 0.0, False, False, None, True)
    for spans in ([0, 9], [4, 4, 0, 4], [0, 4, 2], [0, -1]):
        with pytest.raises(RuntimeError, match="spans must"):
            ops.adam_step_(p, p.clone(), p.clone(), p.clone(), None, *adam, spans)


@needs_ext
def test_baseline_cpu_kernels_match_reference():
    """The kernels are compiled twice (baseline x86-64 and AVX2) and picked at run time
    as torch picks its own; this process runs the AVX2 copy on AVX2 machines, so the
    baseline copy is checked in a child process told to avoid AVX2."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    script = (
        "import torch\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT', torch.backends.cpu.get_cpu_capability()\n"
        "from ops.cases import DTYPES, RUNNERS\n"
        "UPDATE = {'sgd_step_': 'update', 'adam_step_': 'update', 'task_end_': 'update', 'batched_meta_update_': 'updates'}\n"
        "for op, run in RUNNERS.items():\n"
        "    for dtype in DTYPES:\n"
        "        for size, offset in ((0, 0), (1, 0), (17, 1), (4099, 3), (65537, 0)):\n"
        "            run('cpp', 'cpu', size, dtype, offset=offset, seed=size)\n"
        "            if op in UPDATE:\n"
        "                run('cpp', 'cpu', size, dtype, offset=offset, seed=size, **{UPDATE[op]: True})\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
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
