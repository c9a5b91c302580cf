"""Build of reptile_fused._C, the C++/CUDA extension (metadata lives in pyproject.toml).

One shared library holds every op: CPU kernels always, CUDA kernels when a CUDA
toolkit is found.  It registers its ops with the PyTorch dispatcher and uses only
the limited Python C API, so one binary serves every Python >= 3.10 of a given torch.

Environment switches:

* ``REPTILE_FUSED_CUDA``: ``auto`` (default: CUDA kernels when a toolkit is found via
  ``CUDA_HOME``/``CUDA_PATH``, ``nvcc`` on ``PATH`` or ``/usr/local/cuda``, and torch
  is a CUDA build), ``1`` (require them: fail without a toolkit) or ``0`` (CPU only).
* ``REPTILE_FUSED_NO_EXTENSION=1``: install the pure-Python package only (the
  reference backend), for machines without a C++ compiler.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for.  Unset, torch's
  default applies when a GPU is visible (that GPU's architecture); with no GPU
  visible (wheel builders, CI) a fat list from Volta/Turing to the newest GPUs the
  toolkit knows, plus PTX, is used.
* ``MAX_JOBS``: parallel compile jobs (ninja).

A build with the extension gets a version with a local label naming what the binary
was built for, ``0.1.0+torch2.14.1.cu130`` or ``0.1.0+torch2.14.1.cpu``, and
requires exactly that torch release (``torch==2.14.1``): the library uses torch's
C++ ABI, which changes between releases.  Wheel builds (``bdist_wheel``: ``python -m
build --wheel``, ``pip wheel``) also default to the fat architecture list even when a
GPU is visible, strip debug info from the library, and build in their own
``build/wheel-<cpu|cuXYZ>`` folder, emptied of earlier packaging output first, so
nothing stale from another build reaches the wheel.

Every build writes ``reptile_fused/_build_info.py`` beside the library: the torch
and CUDA versions it was compiled against, the architectures and the build time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# The C++/CUDA sources, at the top level as in pytorch/extension-cpp: shared headers
# beside ops.cpp, kernels in cpu/ and cuda/.  The sdist ships them (MANIFEST.in).
CSRC = "csrc"
# Runtime dependencies (pyproject.toml declares them dynamic so that a build with the
# extension can pin the exact torch it was compiled against).
DEPENDENCIES = ["numpy", "tqdm", "pillow"]
MIN_TORCH = "torch>=2.6"
BUILDING_WHEEL = "bdist_wheel" in sys.argv[1:]


def _base_version() -> str:
    """The package version, kept in one place: ``reptile_fused.__version__``."""
    text = (ROOT / "reptile_fused" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if match is None:
        raise SystemExit("setup.py: no __version__ in reptile_fused/__init__.py")
    return match.group(1)


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def _flavour(info: dict) -> str:
    """``cu130`` for kernels built with CUDA 13.0, ``cpu`` for CPU kernels only."""
    if not info["with_cuda"]:
        return "cpu"
    return "cu" + "".join(info["cuda_version"].split(".")[:2])


def _env_switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(f"{name}={value!r}: use 1, 0 or auto")


def _nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _default_arch_list(nvcc: tuple[int, int]) -> str:
    """Every architecture this toolkit can target that torch also supports, plus PTX
    of the newest for GPUs that come later.  CUDA 13 dropped Volta (7.0)."""
    archs = ["7.5", "8.0", "8.6", "8.9", "9.0"]
    if nvcc < (13, 0):
        archs.insert(0, "7.0")
    if nvcc >= (12, 8):
        archs += ["10.0", "12.0"]
    return ";".join(archs) + "+PTX"


def _is_toolkit(home: str | os.PathLike | None) -> bool:
    """A CUDA toolkit folder: nvcc, the runtime headers and the runtime library to link."""
    if not home:
        return False
    home = Path(home)
    has_lib = any(any((home / d).glob("libcudart.so*")) for d in ("lib64", "lib", "targets/x86_64-linux/lib"))
    return (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists() and has_lib


def _find_cuda_home(torch_guess: str | None) -> str | None:
    """Where the CUDA toolkit is.  torch guesses from `nvcc` on PATH by taking its
    grandparent folder, which is wrong when that nvcc is a wrapper script or a link
    (seen: /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc gave /usr/local,
    which has no libcudart to link), so each candidate is checked."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # a wrapper script names the real nvcc inside it
            match = re.search(r"(/\S+)/bin/nvcc", Path(nvcc).read_text(errors="ignore")[:4096])
            if match:
                candidates.append(match.group(1))
        except OSError:
            pass
    return next((c for c in candidates if _is_toolkit(c)), None)


def _extension():
    import torch
    from torch.utils import cpp_extension

    sources = [f"{CSRC}/ops.cpp", f"{CSRC}/cpu/kernels.cpp", f"{CSRC}/cpu/kernels_avx2.cpp"]
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    info = {"torch_version": torch.__version__, "with_cuda": False, "cuda_version": None, "cuda_arch_list": None}

    want = _env_switch("REPTILE_FUSED_CUDA")
    cuda_home = _find_cuda_home(cpp_extension.CUDA_HOME)
    if cuda_home is not None and cuda_home != cpp_extension.CUDA_HOME:
        # BuildExtension reads this module global when it compiles and links.
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["CUDA_HOME"] = cuda_home
    with_cuda = False
    if want != "off":
        missing = None
        if cuda_home is None:
            missing = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
        elif torch.version.cuda is None:
            missing = f"torch {torch.__version__} is a CPU-only build"
        if missing and want == "on":
            raise SystemExit(f"REPTILE_FUSED_CUDA=1 but {missing}")
        if missing:
            print(f"reptile_fused: building CPU kernels only: {missing}")
        with_cuda = missing is None
    if with_cuda:
        nvcc = _nvcc_version(cuda_home)
        # A wheel is for other people's GPUs, so it gets the fat list even when the
        # builder has a GPU (torch's default would compile for that one only).
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and (BUILDING_WHEEL or not torch.cuda.is_available()):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(nvcc or (12, 0))
        info.update(
            with_cuda=True,
            cuda_version=torch.version.cuda,
            cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default (visible GPUs)"),
        )
        sources.append(f"{CSRC}/cuda/kernels.cu")
        print(f"reptile_fused: building CPU + CUDA kernels (nvcc {nvcc}, archs {info['cuda_arch_list']})")
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    args = {"cxx": cxx}
    if with_cuda:
        # No --use_fast_math: it would change the rounding the tests compare against.
        args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        # nvcc compiles a fat list one architecture after another, on one core, after
        # ninja has finished the quick .cpp files; --threads compiles them side by side.
        n_archs = len(re.findall(r"\d+\.\d+", info["cuda_arch_list"]))
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        if n_archs > 1 and jobs > 1:
            args["nvcc"].append(f"--threads={min(jobs, n_archs)}")
    ext = make(
        "reptile_fused._C",
        sources,
        extra_compile_args=args,
        extra_link_args=link,
        py_limited_api=True,
        depends=[f"{CSRC}/{h}" for h in ("element_math.h", "checks.h", "grid.h", "cpu/kernels.h", "cpu/kernels_impl.h")],
    )
    return ext, info


def _build_ext_class(info: dict):
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """BuildExtension (ninja, MAX_JOBS) that also records what the library was built against."""

        def build_extensions(self) -> None:
            start = time.perf_counter()
            super().build_extensions()
            seconds = time.perf_counter() - start
            print(f"reptile_fused: extension built in {seconds:.1f} s")
            for ext in self.extensions:
                if BUILDING_WHEEL:
                    _strip_debug_info(Path(self.get_ext_fullpath(ext.name)))
                target = Path(self.get_ext_fullpath(ext.name)).parent / "_build_info.py"
                target.write_text(
                    '"""Written by setup.py when reptile_fused._C was built: what it was built against."""\n\n'
                    f"TORCH_VERSION = {info['torch_version']!r}\n"
                    f"WITH_CUDA = {info['with_cuda']!r}\n"
                    f"CUDA_VERSION = {info['cuda_version']!r}\n"
                    f"CUDA_ARCH_LIST = {info['cuda_arch_list']!r}\n"
                    f"BUILD_SECONDS = {seconds:.1f}\n"
                )

        def copy_extensions_to_source(self) -> None:
            # --inplace and editable installs copy the library into the source tree;
            # its build record must travel with it.
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                self.copy_file(
                    str(Path(regular_file).parent / "_build_info.py"),
                    str(Path(inplace_file).parent / "_build_info.py"),
                    level=self.verbose,
                )

    return Build.with_options(use_ninja=shutil.which("ninja") is not None)


def _strip_debug_info(library: Path) -> None:
    """Debug sections (from Python's default ``-g``) are most of an unstripped
    library and of no use to people installing a wheel."""
    strip = shutil.which("strip")
    before = library.stat().st_size
    if strip is None:
        print(f"reptile_fused: no `strip` on PATH: {library.name} ships with debug info ({before / 2**20:.1f} MiB)")
        return
    subprocess.run([strip, "--strip-debug", str(library)], check=True)
    after = library.stat().st_size
    print(f"reptile_fused: stripped debug info from {library.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


def _wheel_build_base(flavour: str) -> str:
    """A build folder per wheel flavour, with its packaging output (``lib*``, what
    goes into the wheel) removed: a module deleted from the source tree, or the
    library of the other flavour, must not ship.  Compiled objects (``temp*``) stay,
    so ninja rebuilds only what changed."""
    base = ROOT / "build" / f"wheel-{flavour}"
    for stale in list(base.glob("lib*")) + list(base.glob("bdist*")):
        shutil.rmtree(stale)
    return str(base.relative_to(ROOT))


if _env_switch("REPTILE_FUSED_NO_EXTENSION") == "on":
    # Pure Python: no binary, so any supported torch will do.
    setup(version=_base_version(), install_requires=[MIN_TORCH, *DEPENDENCIES])
else:
    extension, build_info = _extension()
    torch_release = _public(build_info["torch_version"])
    flavour = _flavour(build_info)
    options = {"bdist_wheel": {"py_limited_api": "cp310"}}
    if BUILDING_WHEEL:
        options["build"] = {"build_base": _wheel_build_base(flavour)}
    setup(
        # PEP 440 local label: pip shows it, and the wheel's file name carries it.
        version=f"{_base_version()}+torch{torch_release}.{flavour}",
        install_requires=[f"torch=={torch_release}", *DEPENDENCIES],
        ext_modules=[extension],
        cmdclass={"build_ext": _build_ext_class(build_info)},
        options=options,
    )
