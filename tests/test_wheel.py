"""The CPU-only wheel, built and checked as CI's stand-in for a release build.

``cpu_wheel`` copies the source (package with its C++ sources, build files: no build tree, no
in-place library) into a temporary folder and builds the wheel there with
``python -m build --wheel --no-isolation`` and ``REPTILE_FUSED_CUDA=0``, about a
minute on a 2-core machine.  ``scripts/wheel_check.py`` then installs it into a new
venv and checks it (see that script).  The checker's own rejections are tested on
doctored copies of the same wheel, so a checker that passes everything would fail here.

The CUDA wheel's architecture check takes too long for CI: ``make wheel-check-cuda``."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "wheel_check.py"
RELEASE = torch.__version__.split("+", 1)[0]

pytestmark = pytest.mark.wheel


def load_checker():
    spec = importlib.util.spec_from_file_location("wheel_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py", "*.egg-info")
    shutil.copytree(ROOT / "reptile_fused", src / "reptile_fused", ignore=skip)
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=skip)
    shutil.copytree(ROOT / "tests", src / "tests", ignore=skip)
    return src


@pytest.fixture(scope="module")
def cpu_wheel(source_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, REPTILE_FUSED_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=source_copy, env=env, capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, f"wheel build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    assert re.search(r"stripped debug info from _C\.abi3\.so", build.stdout), build.stdout[-2000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def test_cpu_wheel_name_says_what_it_was_built_for(cpu_wheel):
    assert cpu_wheel.name == f"reptile_fused-0.1.0+torch{RELEASE}.cpu-cp310-abi3-linux_x86_64.whl"


def test_cpu_wheel_passes_the_install_check(cpu_wheel, source_copy, tmp_path):
    """Installed into a fresh venv, imported from outside the source tree: every op has
    a CPU kernel and no CUDA kernel, the ops match the reference, no GPU code."""
    out = subprocess.run(
        [sys.executable, str(CHECK), str(cpu_wheel), "--flavour", "cpu", "--source", str(source_copy),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert "160 op cases match the reference on cpu" in out.stdout
    assert "ELF none, PTX none" in out.stdout or "cuobjdump not found" in out.stdout


def doctored(wheel: Path, tmp_path: Path, drop: str | None = None, add: str | None = None,
             edit: tuple[str, str, str] | None = None) -> Path:
    """A copy of ``wheel`` without member ``drop``, with an extra member ``add``, or
    with ``edit`` = (member, old, new) applied."""
    target = tmp_path / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            if item.filename == drop:
                continue
            data = src.read(item)
            if edit and item.filename.endswith(edit[0]):
                data = data.replace(edit[1].encode(), edit[2].encode())
            dst.writestr(item, data)
        if add:
            dst.writestr(add, b"")
    return target


@pytest.mark.parametrize(
    "change, complaint",
    [
        (dict(add="build/temp.linux-x86_64-cpython-311/csrc/ops.o"), "neither the package nor its library"),
        (dict(add="csrc/cpu/kernels.cpp"), "neither the package nor its library"),
        (dict(add="reptile_fused/__pycache__/flat.cpython-311.pyc"), "neither the package nor its library"),
        (dict(drop="reptile_fused/backends/triton/kernels.py"), "lacks"),
        (dict(drop="reptile_fused/_C.abi3.so"), "lacks"),
        (dict(drop="reptile_fused/data/sine.py"), "differ from"),
        (dict(edit=("METADATA", f"torch=={RELEASE}", "torch>=2.6")), "does not pin"),
        (dict(edit=("_build_info.py", f"TORCH_VERSION = '{torch.__version__}'", "TORCH_VERSION = '2.0.0'")),
         "built for torch 2.0.0"),
    ],
)
def test_checker_rejects_a_bad_wheel(cpu_wheel, source_copy, tmp_path, change, complaint):
    checker = load_checker()
    bad = doctored(cpu_wheel, tmp_path, **change)
    with pytest.raises(checker.CheckFailed, match=re.escape(complaint)):
        checker.check_zip(bad, source_copy, torch.__version__)


def test_requested_arch_list_parsing():
    checker = load_checker()
    elf, ptx = checker.requested_archs("7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
    assert elf == {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"}
    assert ptx == {"sm_120"}
    assert checker.requested_archs("8.0 9.0a+PTX") == ({"sm_80", "sm_90a"}, {"sm_90a"})


def test_arch_check_reads_real_gpu_code(tmp_path):
    """The cuobjdump side of the architecture check, on a tiny library nvcc builds for
    8.0 and 9.0+PTX in seconds (the real fat wheel: ``make wheel-check-cuda``)."""
    checker = load_checker()
    from torch.utils.cpp_extension import CUDA_HOME

    homes = (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda")
    nvcc = next((Path(h) / "bin" / "nvcc" for h in homes if h and (Path(h) / "bin" / "nvcc").is_file()), None)
    cuobjdump = checker.find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    (tmp_path / "k.cu").write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    library = tmp_path / "libk.so"
    subprocess.run(
        [str(nvcc), "-shared", "-Xcompiler", "-fPIC", "-o", str(library), str(tmp_path / "k.cu"),
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"],
        check=True, capture_output=True, timeout=300,
    )
    info = {"WITH_CUDA": True, "CUDA_ARCH_LIST": "8.0;9.0+PTX"}
    assert checker.gpu_code(cuobjdump, library) == ({"sm_80", "sm_90"}, {"sm_90"})
    checker.check_archs(cuobjdump, library, info, None)
    for wrong in ("8.0;9.0", "8.0;8.6;9.0+PTX", "9.0+PTX"):
        with pytest.raises(checker.CheckFailed, match="the library has"):
            checker.check_archs(cuobjdump, library, info, wrong)
    with pytest.raises(checker.CheckFailed, match="CPU-only wheel holds GPU code"):
        checker.check_archs(cuobjdump, library, {"WITH_CUDA": False}, None)
