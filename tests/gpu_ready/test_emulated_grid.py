"""The CUDA kernels' grid-stride index arithmetic, run on the CPU over an emulated grid
(issue 13, section 3).

``csrc/grid.h`` holds that arithmetic as ``__host__ __device__`` code which
``kernels.cu`` uses; ``grid_driver.cpp`` (next to this file) includes it in a plain
g++ build and runs every block and thread of the launch ``kernels.cu`` would make, for
float32/float64/16-bit vector widths, awkward sizes (tails of every length, one short
of a full grid, several chunks per thread), element offsets that break alignment, SM
counts of 1 and 3, ``[n, P]`` row buffers, and single threads of buffers beyond 2**31
elements.  It proves every element is visited exactly once, accesses stay in bounds,
and only 16-byte aligned accesses take the vector path.  About 5 s here (the compile).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
GRID_DIR = CSRC  # grid.h
DRIVER = Path(__file__).with_name("grid_driver.cpp")


@pytest.fixture(scope="module")
def driver_output(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("grid") / "grid_driver"
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{GRID_DIR}", str(DRIVER), "-o", str(exe)],
                           capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout


def test_every_element_exactly_once_and_only_aligned_vectors(driver_output):
    rc, out = driver_output
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert rc == 0 and not fails, "\n".join(fails[:20])
    m = re.search(r"checked (\d+) cases, 0 failures", out)
    assert m and int(m.group(1)) > 400


def test_the_emulation_covers_the_paths(driver_output):
    _, out = driver_output
    cases = re.findall(r"case numel=\d+ offset=\d+ vec=(\d) sms=\d+ aligned=(\d) blocks=\d+ max_chunks=(\d+)", out)
    for vec in ("2", "4", "8"):
        mine = [(a, int(c)) for v, a, c in cases if v == vec]
        assert any(a == "1" and c >= 3 for a, c in mine), f"vec {vec}: no thread took several vector chunks"
        assert any(a == "0" for a, _ in mine), f"vec {vec}: no unaligned case"
    assert re.search(r"rows P=\d+ n=3 offset=0 vec=\d aligned=1", out) and re.search(r"aligned=0", out)
    assert len(re.findall(r"huge numel=(\d+)", out)) == 6


def test_kernels_cu_uses_grid_h():
    """The emulated code is the code the kernels run: flat_kernel's loop, the launch's
    block count, the alignment checks and the row offsets all come from grid.h."""
    src = (CSRC / "cuda" / "kernels.cu").read_text()
    assert '#include "../grid.h"' in src
    for use in ("grid::for_each<VEC>", "grid::thread_of(", "grid::blocks_for(", "grid::aligned16(", "grid::rows_aligned(",
                "grid::row_offset("):
        assert use in src, use
    assert "gridDim.x) * blockDim.x" not in src and "% 16 ==" not in src, "index arithmetic outside grid.h"
