"""The torch-version guard of the C++/CUDA backend: a library built for another torch
(or another CUDA flavour) is never loaded, ``import reptile_fused`` survives with one
warning that names both versions and what to do, and the reference ops take over.

The import cases run in a fresh interpreter each, with a forged build record: the
guard acts before the library is opened, so no mismatched binary is needed, and an
interpreter crash would show as a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reptile_fused.backends import cpp

ROOT = Path(__file__).resolve().parents[1]
RELEASE = torch.__version__.split("+", 1)[0]


def import_with_record(record: dict | None, torch_cuda: str | None | bool = False) -> dict:
    """Import reptile_fused in a new interpreter whose build record is ``record``
    (None: no record at all), optionally pretending torch.version.cuda is
    ``torch_cuda``; return what happened."""
    script = textwrap.dedent(
        f"""
        import json, sys, types, warnings
        import torch
        record, torch_cuda = {record!r}, {torch_cuda!r}
        if torch_cuda is not False:
            torch.version.cuda = torch_cuda
        if record is None:
            sys.modules["reptile_fused._build_info"] = None  # importing it raises ImportError
        else:
            fake = types.ModuleType("reptile_fused._build_info")
            fake.__dict__.update(record)
            sys.modules["reptile_fused._build_info"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import reptile_fused
            from reptile_fused.backends import cpp, get_backend
            backend = get_backend("auto", "cpu")
        p, a, acc = torch.ones(5), torch.zeros(5), torch.zeros(5)
        backend.task_end_(p, a, acc)  # the fallback must work
        print(json.dumps({{
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
            "loaded": "reptile_fused._C" in sys.modules,
            "backend": backend.__name__,
            "reason": cpp.unavailable_reason(torch.device("cpu")),
            "acc": acc.tolist(),
        }}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the interpreter did not survive the import (exit {out.returncode}):\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(torch_version: str, cuda: str | None) -> dict:
    return {"TORCH_VERSION": torch_version, "WITH_CUDA": cuda is not None, "CUDA_VERSION": cuda,
            "CUDA_ARCH_LIST": "9.0" if cuda else None, "BUILD_SECONDS": 1.0}


def assert_refused(result: dict, *phrases: str) -> None:
    assert not result["loaded"], "the mismatched library was loaded"
    assert result["backend"] == "reptile_fused.backends.reference"
    assert result["acc"] == [1.0] * 5
    ours = [w for w in result["warnings"] if "reptile_fused" in w]
    assert len(ours) == 1, result["warnings"]
    for phrase in phrases:
        assert phrase in ours[0], f"{phrase!r} not in {ours[0]!r}"
        assert phrase in result["reason"]


def test_other_torch_release_is_refused_with_both_versions_and_the_fix():
    result = import_with_record(record("2.0.0+cu118", "11.8"))
    assert_refused(
        result,
        "built for torch 2.0.0+cu118",
        f"but torch {torch.__version__}",
        "another torch release",
        "pip install torch==2.0.0",
        f"+torch{RELEASE}.",
        "pip install --no-build-isolation",
    )


def test_cuda_library_with_cpu_only_torch_is_refused():
    result = import_with_record(record(torch.__version__, "13.0"), torch_cuda=None)
    assert_refused(result, "CUDA 13.0 kernels", "a CPU-only build", "need a CUDA build of torch", f"+torch{RELEASE}.cpu")


def test_other_cuda_major_is_refused():
    result = import_with_record(record(torch.__version__, "12.8"), torch_cuda="13.0")
    assert_refused(result, "CUDA 12.8 kernels", "(CUDA 13.0)", "another major CUDA version", f"+torch{RELEASE}.cu130")


def test_library_without_record_is_not_loaded():
    result = import_with_record(None)
    assert not result["loaded"]
    assert result["backend"] == "reptile_fused.backends.reference"
    assert len([w for w in result["warnings"] if "reptile_fused" in w]) == 1
    # Built in place (editable install) or not built at all: either way, never loaded blind.
    assert "no build record" in result["reason"] or "is not built" in result["reason"]


@pytest.mark.parametrize(
    "built, here_cuda",
    [
        (record(torch.__version__, None), None),  # CPU kernels run with any flavour of this release
        (record(torch.__version__, None), "13.0"),
        (record(RELEASE + "+cu130", "13.0"), "13.0"),
        (record(RELEASE + "+cu130", "13.0"), "13.2"),  # CUDA minor-version compatibility
    ],
)
def test_matching_release_is_accepted(built, here_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", here_cuda)
    assert cpp._mismatch(SimpleNamespace(**built)) is None
