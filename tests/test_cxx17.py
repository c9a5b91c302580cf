"""The C++ and CUDA sources compile as C++17, the oldest standard a supported torch uses.

torch 2.11 (the oldest supported release, the GPU machine's) builds extensions with
``-std=c++17``; newer releases pass ``-std=c++20``, which accepts more: a function
template used before its declaration compiled here under torch 2.14 and failed there.
A syntax-only pass of each source under ``-std=c++17`` catches that class of error in
seconds, without the full build (``make test-compat`` does the full build against a
given torch).  It needs the oldest supported torch's headers: newer ones are C++20
themselves.  ``make test`` unpacks them from that release's wheel (the headers only,
into the venv) and names the folder in ``REPTILE_FUSED_CXX17_TORCH``; without it the
tests skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX_SOURCES = ["ops.cpp", "cpu/kernels.cpp", "cpu/kernels_avx2.cpp"]
CUDA_SOURCES = ["cuda/kernels.cu"]
# What torch.utils.cpp_extension defines for an extension named reptile_fused._C.
DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DPy_LIMITED_API=0x030a0000"]


OLDEST_TORCH_ENV = "REPTILE_FUSED_CXX17_TORCH"


def _torch_include() -> Path:
    """``torch/include`` of the oldest supported torch (the folder the variable names holds ``torch/``)."""
    root = os.environ.get(OLDEST_TORCH_ENV)
    if not root:
        pytest.skip(f"{OLDEST_TORCH_ENV} is not set: `make test` unpacks the oldest supported torch's headers")
    include = Path(root) / "torch" / "include"
    assert include.is_dir(), f"{OLDEST_TORCH_ENV}={root}: no torch/include there"
    return include


def _cuda_home() -> Path | None:
    home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if (home / "bin" / "nvcc").exists():
        return home
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parents[1] if nvcc else None


def _includes(cuda_home: Path | None = None) -> list[str]:
    include = _torch_include()
    paths = [include, include / "torch" / "csrc" / "api" / "include", sysconfig.get_paths()["include"], CSRC]
    if cuda_home is not None:
        paths.append(cuda_home / "include")
    return [f"-I{p}" for p in paths]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) or proc.stderr[-4000:]


@pytest.mark.parametrize("source", CXX_SOURCES)
def test_cxx_source_is_cxx17(source):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    _run([cxx, "-std=c++17", "-fsyntax-only", "-fopenmp", "-Wno-unknown-pragmas", *DEFINES, *_includes(),
          str(CSRC / source)])  # fmt: skip


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_is_cxx17(source, tmp_path):
    """nvcc's front end alone (``--cuda``: preprocess and translate the CUDA source to
    host C++, no device code generation), under C++17, for the architecture CI builds."""
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc)")
    _run([str(cuda_home / "bin" / "nvcc"), "-std=c++17", "--cuda", "-arch=sm_90", "--expt-relaxed-constexpr",
          *DEFINES, *_includes(cuda_home), "-o", str(tmp_path / "kernels.cu.cpp.ii"), str(CSRC / source)])  # fmt: skip


def test_the_guard_catches_a_use_before_declaration(tmp_path):
    """What broke under torch 2.11: C++20 accepts this (a name followed by ``<`` is taken
    for a template, found by argument-dependent lookup at instantiation), C++17 rejects
    it.  The guard must see the difference."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "late.cpp"
    src.write_text(
        "struct Pack {};\n"
        "template <int N> struct Op { void apply() { store<N>(Pack{}); } };\n"
        "template <int N> void store(Pack) {}\n"
        "int main() { Op<1>().apply(); }\n"
    )
    cxx17 = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", str(src)], capture_output=True, text=True)
    cxx20 = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert cxx17.returncode != 0 and cxx20.returncode == 0, (cxx17.stderr, cxx20.stderr)
