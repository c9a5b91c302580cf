"""The supported torch/Triton range is declared once (pyproject.toml) and followed
everywhere that names a lower bound: the build requirement, setup.py's requirement for a
build without the extension, the triton extra, the C++17 guard's headers and the pair
`make test-compat` tests by default."""

from __future__ import annotations

import re

from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SUPPORTED = PYPROJECT["tool"]["reptile_fused"]["supported"]


def _lower(spec: str) -> str:
    return re.search(r">=\s*([\d.]+)", spec).group(1)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", version).groups())


def test_every_lower_bound_is_the_declared_one():
    torch_min, triton_min = _lower(SUPPORTED["torch"]), _lower(SUPPORTED["triton"])
    assert f"torch>={torch_min}" in PYPROJECT["build-system"]["requires"]
    assert f"triton>={triton_min}" in PYPROJECT["project"]["optional-dependencies"]["triton"]
    assert PYPROJECT["project"]["requires-python"] == SUPPORTED["python"]
    assert f'MIN_TORCH = "torch>={torch_min}"' in (ROOT / "setup.py").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert f"'torch>={torch_min}'" in makefile
    oldest = re.search(r"^OLDEST_TORCH := ([\d.]+)", makefile, re.M).group(1)
    assert _release(oldest) == _release(torch_min), "the C++17 guard parses against the oldest supported torch"
    pair = re.search(r"^TORCH \?= ([\d.]+)\nTRITON \?= ([\d.]+)", makefile, re.M)
    assert _release(pair.group(1)) == _release(torch_min) and _release(pair.group(2)) == _release(triton_min)


def test_the_torch_here_is_supported():
    low, high = re.match(r">=([\d.]+),<([\d.]+)", SUPPORTED["torch"]).groups()
    assert _release(low) <= _release(torch.__version__) < _release(high), torch.__version__
