"""The register and spill report of the CUDA build (issue 13, section 3): every kernel in
the extension's cubins uses no stack frame and no local memory (no spills).

Reads the built ``reptile_fused._C`` with ``cuobjdump --dump-resource-usage`` (from the
CUDA toolkit, or the copy Triton bundles); skips when the extension was built without
CUDA or no cuobjdump is found.  ``make gpu-check`` builds for the local GPU's
architecture and runs this right after the build.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

# flat_kernel<VEC> for VEC in {16/sizeof(T), 1} for each op and storage dtype, and for
# the ops that take first-order MAML's update once more with it (a template flag, so
# the kernel without it stays what it was).
OPS = ("SgdOp", "AdamOp", "TaskEndOp", "MetaUpdateOp", "BatchedMetaOp")
WITH_UPDATE = ("SgdOp", "AdamOp", "TaskEndOp", "BatchedMetaOp")
EXPECTED_KERNELS = (len(OPS) + len(WITH_UPDATE)) * 4 * 2


def cuobjdump() -> str | None:
    """Where cuobjdump is: the wheel check's own search (toolkit, PATH, Triton's bundled one)."""
    spec = importlib.util.spec_from_file_location("wheel_check", Path(__file__).resolve().parents[2] / "scripts" / "wheel_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuobjdump()


def resource_usage(library: str, tool: str) -> dict[str, dict[str, int]]:
    """{arch: {kernel symbol: {"REG": .., "STACK": .., "LOCAL": ..}}} of every cubin in ``library``."""
    out = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True, check=True).stdout
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch, kernel = "?", None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            kernel = m.group(1)
            continue
        if kernel and "REG:" in line:
            usage.setdefault(arch, {})[kernel] = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", line)}
            kernel = None
    return usage


@pytest.fixture(scope="module")
def usage():
    try:
        import reptile_fused._C as ext
    except ImportError as exc:
        pytest.skip(f"the extension is not built: {exc}")
    from reptile_fused.backends import cpp

    # cuobjdump exits 255 on a library without device code, so a CPU-only build skips here.
    if not (cpp.build_info() or {}).get("WITH_CUDA"):
        pytest.skip("the extension was built without CUDA kernels")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled copy)")
    result = resource_usage(ext.__file__, tool)
    if not result:
        pytest.skip("the extension has no CUDA code (built without a toolkit)")
    return result


def test_every_cuda_kernel_is_in_the_build(usage):
    for arch, kernels in usage.items():
        flat = [k for k in kernels if "flat_kernel" in k]
        assert len(flat) == EXPECTED_KERNELS, f"{arch}: {len(flat)} flat_kernel instances, want {EXPECTED_KERNELS}"
        for op in OPS:
            assert any(op in k for k in flat), f"{arch}: no {op} kernel"


def test_no_stack_frames_or_spills(usage):
    bad = [f"{arch} {k}: {u}" for arch, kernels in usage.items() for k, u in kernels.items()
           if u.get("STACK", 0) or u.get("LOCAL", 0)]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_report(usage, capsys):
    """Not a check: prints the registers per kernel (the gpu-check log keeps it)."""
    with capsys.disabled():
        for arch, kernels in usage.items():
            regs = sorted(u["REG"] for u in kernels.values())
            print(f"\n{arch}: {len(kernels)} kernels, registers {regs[0]}..{regs[-1]}, no stack, no local memory")
