"""The Triton kernels compiled by Triton's own compiler for real GPUs, without a GPU
(issue 13, section 3), with assertions on the generated PTX and cubin.

``triton_aot.py`` (next to this file) runs in a subprocess without ``TRITON_INTERPRET``:
it enumerates every kernel variant the launchers can produce (by calling them over a
grid built from the op table's schemas), compiles a covering set of them for sm_90 and
the all-flags-on variants for sm_80 and sm_75 too (when the installed Triton targets
them), for every autotuning configuration, aligned and not, and reports on each.
Measured here (2 shared cores under load, Triton 3.8, cold cache): 163 compiles in 55-100 s wall;
``triton_aot.py --all`` (every one of the 1724 variants, about 0.5-2 s each here) would
take well over ten minutes on 2 cores and is not part of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_aot.py")
MAX_COMPILES = 300  # the covering set stays bounded; raise deliberately if the kernels grow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    # Without the interpreter (its kernels cannot be compiled), over the full tuning space.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "REPTILE_FUSED_TRITON_TUNE")}
    env["TRITON_CACHE_DIR"] = str(out.parent / "triton-cache")  # cold, and not the user's
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"triton_aot.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _ok(report):
    return [r for r in report["records"] if "error" not in r]


def _where(r):
    flags = {k: v for k, v in r["variant"] if v is True}
    ptrs = sorted({v for _, v in r["variant"] if isinstance(v, str) and v.startswith("*")})
    return f"{r['kernel']} {ptrs} sm_{r['cc']} BLOCK={r['block']} warps={r['warps']} aligned={r['aligned']} n={r['n_spec']} {flags}"


def test_every_kernel_is_reached_by_the_launchers(report):
    assert set(report["variants"]) == set(report["kernels"]), "a kernel no launcher launches, or one the script missed"
    assert all(n > 0 for n in report["variants"].values())


def test_every_flag_is_compiled_both_ways(report):
    """The covering set compiles every constexpr flag with each value the launchers give
    it (a new flag, such as first-order MAML's HAS_UPDATE, enters the grid from the op
    table by itself; BF16_BITS is the interpreter's and always off here)."""
    seen: dict[tuple, set] = {}
    for r in _ok(report):
        for name, value in r["variant"]:
            if isinstance(value, bool):
                seen.setdefault((r["kernel"], name), set()).add(value)
    flags = report["flag_values"]
    missing = [f"{kernel} {flag}: {sorted(seen.get((kernel, flag), ()))} of {values}"
               for kernel, by_flag in flags.items() for flag, values in by_flag.items()
               if seen.get((kernel, flag), set()) != set(values)]  # fmt: skip
    assert not missing, missing
    for kernel in ("_sgd_kernel", "_adam_kernel", "_task_end_kernel"):
        assert flags[kernel]["HAS_UPDATE"] == [False, True]
    assert flags["_batched_meta_update_kernel"]["HAS_UPDATES"] == [False, True]


def test_heavy_update_variants_compile_unaligned_at_every_kept_configuration(report):
    """Adam recording its update has its own tuning configurations (the pruning keeps at
    most 8 elements per thread for it); its all-on variant is compiled unaligned at each."""
    from reptile_fused.backends.triton import kernels as K

    expected = {(block, warps) for block, warps in K._TUNE_SPACE if block // (32 * warps) <= 8}
    for dtype in ("*fp32", "*fp16", "*bf16", "*fp64"):
        got = {(r["block"], r["warps"]) for r in _ok(report) if r["kernel"] == "_adam_kernel" and not r["aligned"]
               and r["cc"] == max(report["archs"]) and ("param_ptr", dtype) in map(tuple, r["variant"])
               and ("HAS_UPDATE", True) in map(tuple, r["variant"]) and ("AMSGRAD", True) in map(tuple, r["variant"])}  # fmt: skip
        assert got == expected, (dtype, got)


def test_every_variant_compiles_for_sm80_and_sm90(report):
    assert {80, 90} <= set(report["archs"]), report["archs"]
    errors = [f"{_where(r)}: {r['error']}" for r in report["records"] if "error" in r]
    assert not errors, "\n".join(errors[:5])
    compiled = {(r["kernel"], r["cc"]) for r in report["records"]}
    for kernel in report["kernels"]:
        for cc in report["archs"]:
            assert (kernel, cc) in compiled, f"{kernel} never compiled for sm_{cc}"
    assert report["compiles"] <= MAX_COMPILES


def test_no_approximate_float32_division(report):
    for r in _ok(report):
        assert set(r["div_f32"]) <= {"div.rn.f32"}, f"{_where(r)}: {r['div_f32']}"
    # The kernels that divide in float32 do show their division, so the check sees them.
    dividing = {r["kernel"] for r in _ok(report) if "div.rn.f32" in r["div_f32"]}
    assert {"_adam_kernel", "_meta_update_kernel", "_batched_meta_update_kernel"} <= dividing
    control = report["control"]
    assert any(d != "div.rn.f32" for d in control["div_f32"]), f"the control's plain '/' should be approximate: {control}"


def test_aligned_float32_buffers_get_128_bit_loads_and_stores(report):
    aligned = [r for r in _ok(report) if r["aligned"] and r["n_spec"] != "one" and ("param_ptr", "*fp32") in map(tuple, r["variant"]) or
               r["aligned"] and r["n_spec"] != "one" and ("theta_ptr", "*fp32") in map(tuple, r["variant"])]  # fmt: skip
    assert aligned
    for r in aligned:
        assert r["ld_width"] == 4 and r["st_width"] == 4, f"{_where(r)}: widest ld v{r['ld_width']}, st v{r['st_width']}"


def test_no_local_memory_spills(report):
    for r in _ok(report):
        assert r["stack"] == 0 and r["local"] == 0 and not r["ptx_local"], f"{_where(r)}: stack {r['stack']}, local {r['local']}"
        assert r["reg"] is not None and r["reg"] <= 255
