"""Compile the Triton kernels for real GPU targets without a GPU, and report on the PTX.

Run as a script in a process *without* ``TRITON_INTERPRET`` (the test suite sets it, and
then the kernels are interpreter objects that cannot be compiled)::

    python tests/gpu_ready/triton_aot.py [--all] [--archs 75,80,90] OUT.json

1. **Variants from the launchers.**  Every launcher of ``ops.LAUNCHERS`` is called over a
   grid built from its op's schema in ``op_table.OPS`` (every storage dtype; each bool
   False/True; each float 0.0/0.9, which flips every ``x != 0`` or ``|1 - x| < 0.5``
   flag; each ``Tensor? x_tensor`` absent, float32 or float64; every other optional
   buffer absent and given, unless the op table says a flag decides whether the kernel
   reads it; ``[n, P]`` buffers with 1 and 3 rows) with ``kernels._launch`` replaced by a recorder, so a variant a
   launcher can produce cannot be forgotten: a new flag or op enters the grid by itself.
   A variant is (kernel, pointer dtypes, constexpr flags).
2. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``,
   Triton's own compiler down to PTX and a cubin (its bundled ptxas), no driver.  By
   default a covering set: for each kernel and storage dtype the all-off and the
   all-on variant and each single flag flipped from all-off; all of them aligned
   (every pointer and the length divisible by 16, what a flat buffer gives) with the
   most elements per thread the autotuner may pick for the dtype; the all-on ones also
   unaligned, with a one-element buffer (float32) and a 64-bit length (float32,
   float16), Adam's at every tuning configuration, and float32/bfloat16 for the other
   architectures (where the pruning keeps different configurations for some variants,
   the all-on variant of each such group).  ``--all`` compiles every variant (measured time in the
   test's docstring).
3. **Report** per compile: the PTX's float32 divisions (``div.rn.f32`` is IEEE,
   ``div.full.f32``/``div.approx.f32`` are not), its widest global load and store, local
   memory declared in the PTX, and the cubin's registers, stack and local memory
   (``cuobjdump --dump-resource-usage``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot.py must run without TRITON_INTERPRET=1: the interpreter's kernels cannot be compiled")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from reptile_fused.backends.op_table import OPS  # noqa: E402
from reptile_fused.backends.triton import kernels as K  # noqa: E402
from reptile_fused.backends.triton import ops as O  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TRITON_DTYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
TL_DTYPE = {"fp32": tl.float32, "fp64": tl.float64}


# ------------------------------------------------------------------ 1. variants from the launchers


def _opmath(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Buffers of the parameters' opmath dtype (_validate's checks), and [n, P] buffers.
OPMATH_BUFFERS = {"acc", "update", "updates"}
ROW_BUFFERS = {"tasks", "updates"}


def _value_grid(op, dtype):
    """Every argument list of the grid for ``op`` on ``dtype`` buffers (schema order)."""
    choices = []
    for arg in op.args:
        if arg.type == "Tensor?" and arg.name.endswith("_tensor"):
            choices.append([None, torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)])
        elif arg.type in ("Tensor", "Tensor?"):
            buffer_dtype = _opmath(dtype) if arg.name in OPMATH_BUFFERS else dtype
            if arg.name in ROW_BUFFERS:
                buffers = [torch.zeros(rows, 16, dtype=buffer_dtype) for rows in (1, 3)]
            else:
                buffers = [torch.zeros(16, dtype=buffer_dtype)]
            # An optional buffer a flag gates (op.only_if) is always passed: the launcher
            # ignores it when the flag is off, as the op table's binding arranges.
            optional = arg.type == "Tensor?" and arg.name not in op.only_if
            choices.append([None, *buffers] if optional else buffers)
        elif arg.type == "float":
            choices.append([0.0, 0.9])
        elif arg.type == "bool":
            choices.append([False, True])
        elif arg.type == "int[]?":
            # Adam's spans: the Triton launcher takes none of it into a kernel, so one value.
            choices.append([None])
        else:
            raise AssertionError(f"{op.name}: no grid for schema type {arg.type!r} ({arg.name}); add one here")
    return itertools.product(*choices)


def _describe(value):
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_DTYPE[value.dtype]
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return "int"
    if isinstance(value, tl.dtype):
        return {tl.float32: "fp32", tl.float64: "fp64"}[value]
    raise TypeError(f"cannot describe {value!r}")


def enumerate_variants() -> dict:
    """{kernel name: sorted list of variants}; a variant maps each kernel argument to a
    pointer type ("*fp32"), "int", None (an absent pointer) or a constexpr's value."""
    assert not K.interpreting()
    assert set(O.LAUNCHERS) == {op.name for op in OPS}, "every op needs a launcher"
    found: dict[str, set] = {}
    launches: dict[str, int] = {}
    current = {}

    def record(raw, tuned, n_elements, block, args, consts):
        names = raw.arg_names
        values = dict(zip(names, args))
        values.update(consts)
        variant = tuple((name, _describe(values[name])) for name in names if name != "BLOCK")
        found.setdefault(raw.__name__, set()).add(variant)
        launches[current["op"]] = launches.get(current["op"], 0) + 1

    real = K._launch
    K._launch = record
    try:
        for op in OPS:
            current["op"] = op.name
            for dtype in DTYPES:
                for args in _value_grid(op, dtype):
                    O.LAUNCHERS[op.name](*args)
    finally:
        K._launch = real
    missing = [op.name for op in OPS if not launches.get(op.name)]
    assert not missing, f"launchers that launched nothing over their grid: {missing}"
    return {k: sorted(v, key=str) for k, v in found.items()}


def jit_kernels() -> dict:
    """Every kernel defined in kernels.py (a @triton.jit function whose name ends in _kernel)."""
    return {name: obj for name, obj in vars(K).items() if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}


@triton.jit
def _control_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    """A plain float32 '/' (what the kernels must not use): shows the PTX check sees it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) / tl.load(y_ptr + offs, mask=mask), mask=mask)


# ------------------------------------------------------------------ 2. the covering set


def _flags(variant):
    return [(name, value) for name, value in variant if isinstance(value, bool)]


def _dtype_of(variant):
    return dict(variant)[next(name for name, v in variant if isinstance(v, str) and v.startswith("*"))]


def covering_set(variants: list) -> tuple[list, list]:
    """(the variants to compile once, the all-on ones that get the full treatment).

    float32 buffers: the all-off and all-on variants, each flag flipped from all-off,
    and each pointer-type choice (a scalar tensor absent, float32 or float64).  The
    other storage dtypes: all-off and all-on.  The all-on variant of every dtype is the
    "heavy" one: most registers, most code.  Where the autotuner's pruning keeps other
    configurations for some variants of a dtype (Adam recording its update keeps fewer),
    the all-on variant of each such group is heavy too, so that every configuration a
    variant may be launched with is compiled for the heaviest variant launched with it.
    """
    by_dtype: dict[str, list] = {}
    for v in variants:
        by_dtype.setdefault(_dtype_of(v), []).append(v)
    chosen, heavy = [], []

    def count(v):
        return sum(1 for _, val in _flags(v) if val)

    def pointer_count(v):
        return sum(1 for _, val in v if isinstance(val, str) and val.startswith("*"))

    for dtype, group in by_dtype.items():
        low = min(group, key=lambda v: (count(v), -pointer_count(v), str(v)))
        high = max(group, key=lambda v: (count(v), pointer_count(v), str(v)))
        picks = [low, high]
        if dtype == "*fp32":
            for name, value in _flags(low):
                flipped = [v for v in group if dict(v)[name] != value]
                if flipped:
                    picks.append(min(flipped, key=lambda v: (sum(1 for a, b in zip(v, low) if a != b), str(v))))
            for name, value in low:
                if value is None or (isinstance(value, str) and value.startswith("*")):
                    for alt in sorted({dict(v)[name] for v in group} - {value}, key=str):
                        picks.append(min((v for v in group if dict(v)[name] == alt), key=str))
        by_configs: dict[tuple, list] = {}
        for v in group:
            by_configs.setdefault(tuple(tuning_configs(v)), []).append(v)
        for same in by_configs.values():
            top = max(same, key=lambda v: (count(v), pointer_count(v), str(v)))
            picks.append(top)
            heavy.append(top)
        for v in picks:
            if v not in chosen:
                chosen.append(v)
    return chosen, heavy


# ------------------------------------------------------------------ 3. compile and report

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _source(fn, variant, block, aligned=True, n_spec="i32"):
    signature, constexprs, attrs = {}, {"BLOCK": block}, {}
    for i, name in enumerate(fn.arg_names):
        if name == "BLOCK":
            signature[name] = "constexpr"
            continue
        value = dict(variant)[name]
        if value is None or isinstance(value, bool) or value in ("fp32", "fp64"):
            signature[name] = "constexpr"
            constexprs[name] = TL_DTYPE[value] if value in ("fp32", "fp64") else value
        elif value.startswith("*"):
            signature[name] = value
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_bits"):
            signature[name] = "i64"
        elif name == "n_elements" and n_spec == "one":
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i64" if n_spec == "i64" else "i32"
            if aligned and name == "n_elements":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def _widest(ptx: str, op: str) -> int:
    """The widest vector width of a global load/store in the PTX (1 = scalar only, 0 = none)."""
    widths = [int(m.group(1) or 1) for m in re.finditer(rf"\b{op}\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfu]\d+", ptx)]
    return max(widths, default=0)


def compile_one(fn, variant, cc, block, warps, aligned=True, n_spec="i32") -> dict:
    start = time.perf_counter()
    record = {"kernel": fn.__name__, "variant": variant, "cc": cc, "block": block, "warps": warps,
              "aligned": aligned, "n_spec": n_spec}  # fmt: skip
    try:
        compiled = triton.compile(_source(fn, variant, block, aligned, n_spec), target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": warps})  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        record["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        return record
    ptx = compiled.asm["ptx"]
    record.update(
        seconds=round(time.perf_counter() - start, 3),
        div_f32=sorted(set(re.findall(r"\bdiv(?:\.[a-z]+)*\.f32\b", ptx))),
        ld_width=_widest(ptx, "ld"),
        st_width=_widest(ptx, "st"),
        ptx_local=bool(re.search(r"^\s*\.local\b", ptx, re.M)),
        **_resource_usage(compiled.asm["cubin"]),
    )
    return record


def tuning_configs(variant) -> list[tuple[int, int]]:
    """The (BLOCK, num_warps) configurations the autotuner's pruning keeps for a large
    buffer of this variant (its pointer arguments given, empty, with their dtypes; absent
    ones None): what it may launch."""
    dtypes = {v: k for k, v in TRITON_DTYPE.items()}
    named = {name: None if v is None else torch.empty(0, dtype=dtypes[v[1:]])
             for name, v in variant if v is None or isinstance(v, str) and v.startswith("*")}  # fmt: skip
    named["n_elements"] = 1 << 24
    kept = K._prune_for_size(K._configs(), named)
    return [(c.kwargs["BLOCK"], c.num_warps) for c in kept]


def heaviest_config(variant) -> tuple[int, int]:
    """The configuration with the most elements per thread (most registers)."""
    return max(tuning_configs(variant), key=lambda c: (c[0] // (c[1] * 32), c[0]))


def _compile_job(job):
    name, variant, *rest = job
    return compile_one(jit_kernels()[name], variant, *rest)


def supported_archs(wanted) -> list[int]:
    from triton.backends.nvidia.compiler import CUDABackend

    out = []
    for cc in wanted:
        try:
            CUDABackend(GPUTarget("cuda", cc, 32))
            out.append(cc)
        except Exception:  # noqa: BLE001 - this Triton does not target it
            pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--all", action="store_true", help="compile every variant, not the covering set")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    parser.add_argument("--archs", default="75,80,90", help="compute capabilities (the first supported ones are used)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    archs = supported_archs(int(a) for a in args.archs.split(","))
    main_cc = 90 if 90 in archs else archs[-1]
    variants = enumerate_variants()
    kernels = jit_kernels()
    jobs = []  # (kernel name, variant, cc, block, warps, aligned, n_spec)
    for name, vs in variants.items():
        if args.all:
            chosen, heavy = vs, [max(vs, key=lambda v: sum(1 for _, x in _flags(v) if x))]
        else:
            chosen, heavy = covering_set(vs)
        for v in chosen:
            jobs.append((name, v, main_cc, *heaviest_config(v), True, "i32"))
        for v in heavy:
            fp32 = _dtype_of(v) == "*fp32"
            heaviest = heaviest_config(v)
            # Unaligned buffers take the scalar path: more registers.  Adam, the kernel with
            # by far the most registers, at every configuration the autotuner may pick for
            # this dtype; the others at the one with the most elements per thread.
            configs = tuning_configs(v) if name == "_adam_kernel" else [heaviest]
            for b, w in configs:
                jobs += [(name, v, main_cc, b, w, aligned, "i32") for aligned in (True, False) if (b, w, aligned) != (*heaviest, True)]
            if fp32 or _dtype_of(v) == "*fp16":
                jobs.append((name, v, main_cc, *heaviest, True, "i64"))  # a length beyond 2**31
            if fp32:
                jobs.append((name, v, main_cc, *heaviest, False, "one"))  # a one-element buffer
            if fp32 or _dtype_of(v) == "*bf16":
                jobs += [(name, v, cc, *heaviest, True, "i32") for cc in archs if cc != main_cc]
    workers = max(1, min(args.jobs or os.cpu_count() or 1, len(jobs)))
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            records = pool.map(_compile_job, jobs, chunksize=1)
    else:
        records = [_compile_job(job) for job in jobs]
    control = (("x_ptr", "*fp32"), ("y_ptr", "*fp32"), ("out_ptr", "*fp32"), ("n_elements", "int"))
    control_record = compile_one(_control_kernel, control, main_cc, 1024, 4)
    summary = {
        "triton": triton.__version__,
        "archs": archs,
        "all": args.all,
        "variants": {name: len(vs) for name, vs in variants.items()},
        # Each constexpr flag's values over the variants the launchers can produce.
        "flag_values": {name: {flag: sorted({dict(v)[flag] for v in vs}) for flag, _ in _flags(vs[0])}
                        for name, vs in variants.items()},  # fmt: skip
        "kernels": sorted(kernels),
        "compiles": len(records),
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 1),
        "records": records,
        "control": control_record,
    }
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"{len(records)} compiles of {sum(summary['variants'].values())} variants for sm_{archs} "
          f"in {summary['seconds']} s -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
