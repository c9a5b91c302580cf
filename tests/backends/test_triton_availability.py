"""The package without Triton, and Triton where it cannot run: clear errors, nothing else broken.

Each case runs in a fresh interpreter, since whether Triton is importable and whether
its interpreter is on are fixed when Triton is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = textwrap.dedent(
    """
    import json, sys
    {prelude}
    import torch
    import reptile_fused
    from reptile_fused import BackendUnavailableError, available_backends, get_backend
    from reptile_fused.backends import unavailable_reason
    out = {{"available_cpu": available_backends("cpu")}}
    out["reason_cpu"] = unavailable_reason("triton", "cpu")
    out["reason_cuda"] = unavailable_reason("triton", "cuda")
    try:
        get_backend("triton", "cpu")
        out["error"] = None
    except BackendUnavailableError as exc:
        out["error"] = str(exc)
    from reptile_fused.backends import triton as T
    p, g = torch.zeros(3), torch.ones(3)
    try:
        T.sgd_step_(p, g, None, 0.1)
        out["direct_call"] = None
    except BackendUnavailableError as exc:
        out["direct_call"] = str(exc)
    out["param_untouched"] = bool((p == 0).all())
    print(json.dumps(out))
    """
)


def _probe(prelude: str, env_update: dict[str, str | None]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(prelude=prelude)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_package_works_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError, as if it were not installed.
    out = _probe("sys.modules['triton'] = None", {"TRITON_INTERPRET": "1"})
    assert out["available_cpu"][-1] == "reference" and "triton" not in out["available_cpu"]
    for reason in (out["reason_cpu"], out["reason_cuda"]):
        assert "Triton could not be loaded" in reason and "pip install triton" in reason
    assert "backend 'triton' cannot run on cpu" in out["error"]
    assert "Triton could not be loaded" in out["direct_call"]
    assert out["param_untouched"]


def test_package_import_does_not_import_triton():
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-c", "import sys, reptile_fused; print('triton' in sys.modules)"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_cpu_tensors_need_the_interpreter():
    pytest.importorskip("triton")
    out = _probe("", {"TRITON_INTERPRET": None, "CUDA_VISIBLE_DEVICES": ""})
    assert "TRITON_INTERPRET=1" in out["reason_cpu"]
    assert "triton" not in out["available_cpu"]
    assert "TRITON_INTERPRET=1" in out["error"]
    assert "TRITON_INTERPRET=1" in out["direct_call"]
    assert out["param_untouched"]
    # Hidden GPUs: CUDA buffers are refused with a reason, not a crash.
    assert out["reason_cuda"] == "CUDA is not available"
