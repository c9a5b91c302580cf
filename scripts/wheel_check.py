#!/usr/bin/env python3
"""Check a built reptile-fused wheel the way a user would meet it (``make wheel-check``).

    python scripts/wheel_check.py WHEEL_OR_DIR [--flavour cpu|cuda] [--archs LIST]
                                  [--source DIR] [--pytest ARGS] [--workdir DIR] [--keep]

Run it with the Python whose torch the wheel was built for (the project venv).  It

1. reads the wheel as a zip: the file name and metadata name the torch and CUDA it was
   built for (``+torch2.14.1.cpu`` / ``+torch2.14.1.cu130``, ``Requires-Dist:
   torch==2.14.1``), and it holds the package, the Triton kernels, the compiled library
   and its build record, and nothing from the build tree (with ``--source``: exactly
   the ``.py`` files of the source package);
2. installs it with ``pip --no-deps`` into a new virtual environment that sees this
   torch through a ``.pth`` file (no second torch download), imports it from a
   directory outside the source tree with ``python -I`` (no PYTHONPATH, no cwd on
   ``sys.path``), and checks that the package and its library come from that venv,
   that every op has a CPU kernel (and a CUDA kernel exactly when the wheel has CUDA
   kernels), and that the CPU ops (and the CUDA ops, if a GPU is visible) match the
   reference ops on several sizes and every dtype;
3. lists the GPU code in the installed library with ``cuobjdump`` and asserts that
   the ELF architectures (and PTX) are exactly the requested list: ``--archs``, or
   the list the build record says was requested; a CPU wheel must hold no GPU code;
4. with ``--pytest ARGS``: copies the source ``tests/`` next to the venv and runs
   ``pytest ARGS`` there, so the tests import the installed wheel (how the GPU tests
   run from a wheel on a GPU machine: ``--pytest "-m gpu"``).

WHEEL_OR_DIR may be a folder: the newest wheel of ``--flavour`` in it is checked.
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "reptile_fused"
DIST = "reptile_fused"  # the wheel's distribution-name prefix
LIBRARY = f"{PACKAGE}/_C.abi3.so"
REQUIRED = [
    f"{PACKAGE}/__init__.py",
    f"{PACKAGE}/reference.py",
    f"{PACKAGE}/backends/op_table.py",
    f"{PACKAGE}/backends/cpp/__init__.py",
    f"{PACKAGE}/backends/triton/__init__.py",
    f"{PACKAGE}/backends/triton/kernels.py",
    f"{PACKAGE}/backends/triton/ops.py",
    f"{PACKAGE}/app/cli.py",
    f"{PACKAGE}/_build_info.py",
    LIBRARY,
]
OPS = ("sgd_step_", "adam_step_", "task_end_", "meta_update_", "batched_meta_update_")  # as backends/op_table.py


class CheckFailed(AssertionError):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def log(message: str) -> None:
    print(f"wheel_check: {message}", flush=True)


# ----------------------------------------------------------------------- 1. the zip


def pick_wheel(path: Path, flavour: str | None) -> Path:
    if path.is_file():
        return path
    pattern = {"cpu": "*.cpu-*.whl", "cuda": "*.cu[0-9]*-*.whl", None: "*.whl"}[flavour]
    wheels = sorted(path.glob(f"{DIST}-{pattern}"), key=lambda p: p.stat().st_mtime)
    require(bool(wheels), f"no {flavour or ''} wheel matching {DIST}-{pattern} in {path}")
    return wheels[-1]


def read_build_info(text: str) -> dict:
    record: dict = {}
    exec(compile(text, "_build_info.py", "exec"), {}, record)  # a file setup.py wrote: plain assignments
    return {k: v for k, v in record.items() if k.isupper()}


def check_zip(wheel: Path, source: Path | None, torch_version: str) -> dict:
    """The wheel's name, metadata and members; returns its build record."""
    match = re.fullmatch(r"(\w+)-([^-]+)-(\w+)-(\w+)-(\w+)\.whl", wheel.name)
    require(match is not None, f"not a wheel file name: {wheel.name}")
    name, version, python_tag, abi_tag, _platform = match.groups()
    require(name == DIST, f"distribution {name!r}, expected {DIST!r}")
    require((python_tag, abi_tag) == ("cp310", "abi3"), f"tag {python_tag}-{abi_tag}, expected cp310-abi3")
    dist_info = f"{DIST}-{version}.dist-info/"
    with zipfile.ZipFile(wheel) as zf:
        members = [i.filename for i in zf.infolist() if not i.is_dir()]
        missing = [m for m in [*REQUIRED, f"{dist_info}METADATA"] if m not in members]
        require(not missing, f"wheel lacks {missing}")
        info = read_build_info(zf.read(f"{PACKAGE}/_build_info.py").decode())
        metadata = zf.read(f"{dist_info}METADATA").decode()
        library_size = zf.getinfo(LIBRARY).file_size

    release = torch_version.split("+", 1)[0]
    flavour = "cu" + "".join(info["CUDA_VERSION"].split(".")[:2]) if info["WITH_CUDA"] else "cpu"
    require(
        version.endswith(f"+torch{release}.{flavour}"),
        f"version {version} does not name the torch/CUDA it was built for (+torch{release}.{flavour})",
    )
    require(info["TORCH_VERSION"] == torch_version, f"built for torch {info['TORCH_VERSION']}, this is {torch_version}")
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    require(f"torch=={release}" in requires, f"metadata does not pin torch=={release}: {requires}")

    strays = [
        m for m in members
        if not m.startswith(dist_info) and not (m.startswith(f"{PACKAGE}/") and (m.endswith(".py") or m == LIBRARY))
    ]
    require(not strays, f"wheel holds files that are neither the package nor its library: {strays}")
    if source is not None:
        expected = {p.relative_to(source).as_posix() for p in (source / PACKAGE).rglob("*.py")}
        expected.discard(f"{PACKAGE}/_build_info.py")  # written by the build, checked above
        shipped = {m for m in members if m.endswith(".py")} - {f"{PACKAGE}/_build_info.py"}
        require(shipped == expected, f"wheel .py files differ from {source}: "
                f"missing {sorted(expected - shipped)}, extra {sorted(shipped - expected)}")
    log(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB wheel, library {library_size / 2**20:.2f} MiB, "
        f"{len(members)} files, Requires-Dist torch=={release}, build record {info}")
    return info


# ------------------------------------------------------------- 2. a fresh virtual env


def host_site_dirs() -> list[str]:
    """The folders this interpreter imports torch, numpy, triton, pytest... from:
    torch's own first, then every site-packages (a distribution Python may keep them
    in several)."""
    import site

    dirs = [str(Path(importlib.util.find_spec("torch").origin).parent.parent)]
    dirs += site.getsitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def make_venv(root: Path) -> Path:
    """A venv with no torch of its own: ``.pth`` lines put the folders holding this
    interpreter's torch (and numpy, triton, pytest...) *after* the venv's own
    site-packages, so the installed wheel wins over any copy of the package there, and
    nothing is downloaded.  A bare path line adds that one folder only; its own
    ``.pth`` files (an editable install of this project, for one) are not processed."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(site) / "_reptile_fused_check_torch.pth").write_text("".join(f"{d}\n" for d in host_site_dirs()))
    return python


def install(python: Path, wheel: Path) -> None:
    """pip of this interpreter (same Python version as the venv) unpacks the wheel into
    the venv's site-packages; ``--target`` works with any pip, unlike ``--python``.
    ``--no-deps --no-index``: torch & co. come through the .pth file, nothing is fetched."""
    site = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
         "--disable-pip-version-check", "--target", site, str(wheel)],
        check=True,
    )


def clean_env() -> dict:
    """This environment without what would let the source tree leak onto ``sys.path``."""
    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # Triton runs on the CPU only in its interpreter
    return env


def run_inside(python: Path, cwd: Path, expect_cuda: bool, source: Path | None) -> dict:
    cmd = [str(python), "-I", str(Path(__file__).resolve()), "--inside", "--expect-cuda" if expect_cuda else "--cpu-only"]
    if source is not None:
        cmd += ["--source", str(source.resolve())]
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    require(out.returncode == 0, f"the check inside the venv failed (exit {out.returncode}): {out.stdout}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------- inside the venv (python -I)


def inside(expect_cuda: bool, source: Path | None) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        import reptile_fused
        from reptile_fused import reference as ref
        from reptile_fused.backends import cpp, get_backend

    prefix = Path(sys.prefix).resolve()
    location = Path(reptile_fused.__file__).resolve()
    require(location.is_relative_to(prefix), f"reptile_fused imported from {location}, not from the venv {prefix}")
    if source is not None:
        require(not location.is_relative_to(source), f"reptile_fused imported from the source tree {location}")
    require(cpp._LOAD_ERROR is None, f"the installed library did not load: {cpp._LOAD_ERROR}")
    library = Path(sys.modules["reptile_fused._C"].__file__).resolve()
    require(library.is_relative_to(prefix), f"reptile_fused._C loaded from {library}, not from the venv")
    ours = [str(w.message) for w in caught if "reptile_fused" in str(w.message)]
    require(not ours, f"import warned: {ours}")

    from importlib.metadata import requires, version

    release = torch.__version__.split("+", 1)[0]
    require(f"torch=={release}" in (requires("reptile-fused") or []), f"installed metadata: {requires('reptile-fused')}")

    for op in OPS:
        require(torch._C._dispatch_has_kernel_for_dispatch_key(f"reptile_fused::{op}", "CPU"), f"{op}: no CPU kernel")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"reptile_fused::{op}", "CUDA")
        require(has_cuda == expect_cuda, f"{op}: CUDA kernel registered={has_cuda}, wheel has CUDA kernels={expect_cuda}")
    require(get_backend("auto", "cpu") is cpp, "backend 'auto' does not pick the cpp backend on the CPU")

    devices = ["cpu"] + (["cuda"] if expect_cuda and torch.cuda.is_available() else [])
    cases = 0
    for device in devices:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for size in (0, 1, 17, 1023, 65537):
                cases += compare_ops(ref, cpp, torch, size, dtype, device)
    print(json.dumps({
        "version": version("reptile-fused"), "package": str(location.parent), "library": str(library),
        "build_info": cpp.build_info(), "devices": devices, "cases": cases,
    }))


def compare_ops(ref, cpp, torch, n: int, dtype, device: str) -> int:
    """Every op, on twin copies of the same inputs, cpp vs reference; returns the case count."""
    gen = torch.Generator().manual_seed(n)
    opmath = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def rnd(scale=1.0, positive=False, kind=None):
        x = torch.rand(n, generator=gen, dtype=torch.float64) if positive else torch.randn(n, generator=gen, dtype=torch.float64)
        return (x * scale).to(kind or dtype).to(device)

    def both(make_args, run_ref, run_cpp, label):
        a = make_args()
        b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
        run_ref(**a)
        run_cpp(**b)
        for k, v in a.items():
            if torch.is_tensor(v):
                close(b[k], v, f"{label} {k} n={n} {dtype} {device}")

    def close(actual, expected, label):
        if actual.numel() == 0:
            return
        a, e = actual.double().cpu(), expected.double().cpu()
        info = torch.finfo(actual.dtype)
        if actual.dtype in (torch.float32, torch.float64):
            tol = 4 * info.eps * (1 + e.abs())
        else:  # one ulp of the storage dtype of the reference's fp32-opmath result
            tol = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(info.tiny)))) * info.eps + 2e-6
        bad = (a - e).abs() > tol
        require(not bool(bad.any()), f"{label}: {int(bad.sum())} of {a.numel()} elements differ from the reference")

    count = 2  # task_end_ and meta_update_, one case each
    for nesterov in (False, True):
        both(lambda: dict(param=rnd(), grad=rnd(), momentum_buffer=rnd()),
             lambda **k: ref.sgd_step_(k["param"], k["grad"], k["momentum_buffer"], 0.1, momentum=0.9,
                                       dampening=0.1, weight_decay=0.01, nesterov=nesterov),
             lambda **k: cpp.sgd_step_(k["param"], k["grad"], k["momentum_buffer"], 0.1, momentum=0.9,
                                       dampening=0.1, weight_decay=0.01, nesterov=nesterov),
             f"sgd_step_(nesterov={nesterov})")
        count += 1
    for amsgrad in (False, True):
        def adam_args():
            v = rnd(positive=True)
            return dict(param=rnd(), grad=rnd(), exp_avg=rnd(0.1), exp_avg_sq=v,
                        max_exp_avg_sq=(v.double() + rnd(0.5, positive=True).double()).to(dtype))

        both(adam_args,
             lambda **k: ref.adam_step_(k["param"], k["grad"], k["exp_avg"], k["exp_avg_sq"],
                                        k["max_exp_avg_sq"] if amsgrad else None, 3, 1e-2, amsgrad=amsgrad),
             lambda **k: cpp.adam_step_(k["param"], k["grad"], k["exp_avg"], k["exp_avg_sq"],
                                        k["max_exp_avg_sq"] if amsgrad else None, 3, 1e-2, amsgrad=amsgrad),
             f"adam_step_(amsgrad={amsgrad})")
        count += 1
    both(lambda: dict(param=rnd(), anchor=rnd(), acc=rnd(kind=opmath)),
         lambda **k: ref.task_end_(k["param"], k["anchor"], k["acc"]),
         lambda **k: cpp.task_end_(k["param"], k["anchor"], k["acc"]), "task_end_")
    both(lambda: dict(param=rnd(), anchor=rnd(), acc=rnd(kind=opmath)),
         lambda **k: ref.meta_update_(k["param"], k["anchor"], k["acc"], 0.5, 3),
         lambda **k: cpp.meta_update_(k["param"], k["anchor"], k["acc"], 0.5, 3), "meta_update_")
    for write_back in (True, False):
        both(lambda: dict(theta=rnd(), tasks=torch.stack([rnd() for _ in range(3)])),
             lambda **k: ref.batched_meta_update_(k["theta"], k["tasks"], 0.3, write_back=write_back),
             lambda **k: cpp.batched_meta_update_(k["theta"], k["tasks"], 0.3, write_back=write_back),
             f"batched_meta_update_(write_back={write_back})")
        count += 1
    return count


# -------------------------------------------------------------- 3. GPU code (cuobjdump)


def find_cuobjdump() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "cuobjdump").is_file():
            return str(Path(home) / "bin" / "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    spec = importlib.util.find_spec("triton")  # Triton's NVIDIA backend ships one
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    return None


def requested_archs(arch_list: str) -> tuple[set[str], set[str]]:
    """``"7.5;8.0 9.0a+PTX"`` -> ({"sm_75", "sm_80", "sm_90a"}, {"sm_90a"}): the cubins
    and PTX that torch's arch flags produce for it."""
    elf, ptx = set(), set()
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        with_ptx = item.endswith("+PTX")
        major, minor = item.removesuffix("+PTX").split(".")
        arch = f"sm_{major}{minor}"
        elf.add(arch)
        if with_ptx:
            ptx.add(arch)
    return elf, ptx


def gpu_code(cuobjdump: str, library: Path) -> tuple[set[str], set[str]]:
    listed = {}
    for kind in ("elf", "ptx"):
        out = subprocess.run([cuobjdump, f"--list-{kind}", str(library)], capture_output=True, text=True)
        text = out.stdout + out.stderr
        if out.returncode != 0 and "does not contain device code" not in text:
            raise CheckFailed(f"cuobjdump --list-{kind} failed: {text.strip()}")
        # ELF file    1: _C.1.sm_75.cubin / PTX file    1: _C.1.sm_120.ptx
        listed[kind] = set(re.findall(r"\.(sm_\d+[a-z]?)\.(?:cubin|ptx)", text))
    return listed["elf"], listed["ptx"]


def check_archs(cuobjdump: str | None, library: Path, info: dict, archs: str | None) -> None:
    if cuobjdump is None:
        require(archs is None and not info["WITH_CUDA"], "cuobjdump not found (CUDA_HOME/bin, PATH or triton's copy)")
        log("cuobjdump not found: GPU code not listed (CPU wheel)")
        return
    elf, ptx = gpu_code(cuobjdump, library)
    log(f"GPU code in {library.name} ({cuobjdump}): ELF {sorted(elf) or 'none'}, PTX {sorted(ptx) or 'none'}")
    if not info["WITH_CUDA"]:
        require(not elf and not ptx, "a CPU-only wheel holds GPU code")
        return
    request = archs if archs is not None else info["CUDA_ARCH_LIST"]
    want_elf, want_ptx = requested_archs(request)
    require((elf, ptx) == (want_elf, want_ptx),
            f"requested {request!r} = ELF {sorted(want_elf)} PTX {sorted(want_ptx)}; the library has "
            f"ELF {sorted(elf)} PTX {sorted(ptx)}")


# --------------------------------------------------------------------- 4. the tests


def run_tests(python: Path, work: Path, source: Path, args: str, expect_cuda: bool) -> None:
    tests = work / "tests"
    shutil.copytree(source / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    # The markers of the project's pytest configuration, without pointing pytest at the source tree.
    (work / "pytest.ini").write_text(
        "[pytest]\ntestpaths = tests\nmarkers =\n    gpu: needs a CUDA device\n    slow: slow on the CPU\n"
        "    wheel: builds and installs a wheel\n"
    )
    env = clean_env()
    if not expect_cuda:
        env["REPTILE_FUSED_CUDA"] = "0"  # tells the tests that no CUDA kernels are expected
    cmd = [str(python), "-m", "pytest", "-p", "no:cacheprovider", *shlex.split(args)]
    log(f"running {' '.join(cmd)} in {work}")
    require(subprocess.run(cmd, cwd=work, env=env).returncode == 0, "tests against the installed wheel failed")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", nargs="?", type=Path, help="a wheel, or a folder holding wheels")
    parser.add_argument("--flavour", choices=("cpu", "cuda"), help="which wheel to pick from a folder")
    parser.add_argument("--archs", help="the requested TORCH_CUDA_ARCH_LIST (default: the build record's)")
    parser.add_argument("--source", type=Path, help="the source tree: exact .py file list, tests for --pytest")
    parser.add_argument("--pytest", metavar="ARGS", help="run pytest ARGS on a copy of SOURCE/tests against the wheel")
    parser.add_argument("--workdir", type=Path, help="where the venv goes (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the venv")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expect-cuda", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        inside(args.expect_cuda, args.source)
        return 0
    if args.wheel is None:
        parser.error("give a wheel or a folder of wheels")
    if args.pytest is not None and args.source is None:
        parser.error("--pytest needs --source (the tests are copied from it)")

    import torch

    start = time.perf_counter()
    try:
        wheel = pick_wheel(args.wheel, args.flavour)
        log(f"checking {wheel}")
        info = check_zip(wheel, args.source, torch.__version__)
        if args.flavour == "cuda":
            require(info["WITH_CUDA"], f"{wheel.name} has no CUDA kernels")
        root = Path(tempfile.mkdtemp(prefix="reptile-wheel-check-", dir=args.workdir))
        try:
            python = make_venv(root)
            install(python, wheel)
            work = root / "outside"  # cwd with no source tree in sight
            work.mkdir()
            result = run_inside(python, work, bool(info["WITH_CUDA"]), args.source)
            log(f"installed {result['version']} at {result['package']}; {result['cases']} op cases match the "
                f"reference on {', '.join(result['devices'])}; every op has a CPU kernel"
                + (" and a CUDA kernel" if info["WITH_CUDA"] else ", none has a CUDA kernel (CPU wheel)"))
            check_archs(find_cuobjdump(), Path(result["library"]), info, args.archs)
            if args.pytest is not None:
                run_tests(python, work, args.source, args.pytest, bool(info["WITH_CUDA"]))
        finally:
            if args.keep:
                log(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    except (CheckFailed, subprocess.CalledProcessError) as exc:
        log(f"FAILED: {exc}")
        return 1
    log(f"all checks passed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
