"""The library does not depend on the application: importing every library module loads no ``reptile_fused.app``."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import reptile_fused

ROOT = Path(__file__).resolve().parents[1]


def library_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(reptile_fused.__path__, "reptile_fused."):
        if info.name == "reptile_fused.app" or info.name.startswith("reptile_fused.app."):
            continue
        if info.name == "reptile_fused.__main__":  # the command line's entry point, by definition
            continue
        names.append(info.name)
    return names


def test_library_modules_do_not_import_the_application():
    modules = library_modules()
    assert {"reptile_fused.optimizer", "reptile_fused.batched.reptile", "reptile_fused.backends.op_table"} <= set(modules)
    probe = (
        "import importlib, json, sys\n"
        f"failed = {{}}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed[name] = str(exc)\n"
        "print(json.dumps({'app': sorted(m for m in sys.modules if m.startswith('reptile_fused.app')), 'failed': failed}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["app"] == []
    # Only the Triton kernels may be missing (no Triton installed); nothing else may fail to import.
    assert all(name.startswith("reptile_fused.backends.triton.") for name in result["failed"]), result["failed"]


def test_command_line_lives_in_the_application():
    import reptile_fused.app.cli as cli

    assert callable(cli.main)
    assert (ROOT / "reptile_fused" / "app" / "cli.py").is_file()


def test_native_sources_live_in_top_level_csrc():
    """The C++/CUDA sources are in csrc/ (shared headers beside ops.cpp, cpu/ and cuda/),
    none under the Python package, and the sdist takes them along (MANIFEST.in)."""
    native = [p for p in (ROOT / "reptile_fused").rglob("*") if p.suffix in (".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp")]
    assert native == []
    csrc = ROOT / "csrc"
    assert {"ops.cpp", "element_math.h", "checks.h", "grid.h", "cpu", "cuda"} <= {p.name for p in csrc.iterdir()}
    assert "graft csrc" in (ROOT / "MANIFEST.in").read_text().splitlines()
