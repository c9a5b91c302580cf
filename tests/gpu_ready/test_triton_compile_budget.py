"""The Triton compiles of `make gpu-check`'s Triton test stage fit its time.

That stage runs the gpu-marked Triton tests with one launch configuration
(REPTILE_FUSED_TRITON_TUNE=single), so Triton never autotunes there and compiles each
kernel specialisation once.  ``scripts/count_triton_compiles.py`` measures how many: it
runs the CPU mirror of the stage's op tests (the same test functions on the CPU, the
bulk of the stage) under the interpreter with the launch recorder of
tests/triton_launch_log.py, counting distinct specialisations the way Triton keys its
compiles, and records a fingerprint of the files that decide them.  At 0.2 s a compile,
half of the stage's shard-seconds must cover them.  The measurement takes minutes, so
it is committed (benchmarks/results/triton_compiles.json) and checked for staleness.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS_PER_COMPILE = 0.2


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look the module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured():
    counter = _load("count_triton_compiles", ROOT / "scripts" / "count_triton_compiles.py")
    data = json.loads(counter.OUT.read_text())
    assert data["fingerprint"] == counter.fingerprint(), (
        "the Triton kernels or the op tests changed since the compiles were counted: "
        "rerun `python scripts/count_triton_compiles.py` and commit its result"
    )
    return data


def test_the_test_stage_never_autotunes(measured):
    assert measured["tune_space"] == [[1024, 4]]
    assert measured["autotune_keys"] == 0
    assert measured["launches"] > 1000, "the mirror ran too little to count anything"


def test_the_compiles_fit_the_triton_test_stage(measured):
    gc = _load("gpu_check", ROOT / "scripts" / "gpu_check.py")
    timeout = gc.PLAN["triton_tests"][1]
    shards = gc.test_shards(16)  # the H200 machine's cores
    bound = int(timeout * shards / 2 / SECONDS_PER_COMPILE)
    assert measured["compiles"] <= bound, (
        f"{measured['compiles']} Triton compiles for the op tests alone; the stage's {timeout} s x {shards} shards "
        f"allow {bound} at {SECONDS_PER_COMPILE} s each (half the time for compiling)"
    )


def test_single_tuning_has_one_configuration_every_kernel_can_use(monkeypatch):
    pytest.importorskip("triton")
    from reptile_fused.backends.triton import kernels

    monkeypatch.setenv("REPTILE_FUSED_TRITON_TUNE", "single")
    assert kernels._tune_space() == ((1024, 4),)
    monkeypatch.setenv("REPTILE_FUSED_TRITON_TUNE", "fast")
    with pytest.raises(ValueError, match="expected one of full, quick, single"):
        kernels._tune_space()


def test_bit_patterns_do_not_specialise():
    """The float64 bit patterns of the scalars are typed int64 and not specialised: 0.0
    (an int32 value), 1.0 and a value whose pattern is a multiple of 16 share one key."""
    pytest.importorskip("triton")
    import torch
    from triton_launch_log import compile_key

    from reptile_fused.backends.triton import kernels

    p = torch.zeros(64)
    keys = set()
    for lr in (0.0, 1.0, 0.5, 2.0**-1074):
        args = (p, p, None, None, kernels.f64_bits(lr), None, kernels.f64_bits(0.0), kernels.f64_bits(1.0),
                kernels.f64_bits(0.0), 64)  # fmt: skip
        keys.add(compile_key(kernels._sgd_kernel, args, {}, (1024, 4)))
    assert len(keys) == 1, keys
