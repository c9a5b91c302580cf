"""The C++/CUDA backend: the fused kernels of the compiled extension ``reptile_fused._C``.

The extension (sources in the top-level ``csrc/``: the op schemas in ``ops.cpp``,
the shared per-element math and checks, ``cpu/`` and ``cuda/`` kernels) registers
``torch.ops.reptile_fused.*``: CPU kernels always, CUDA kernels when it was built
with a CUDA toolkit.  The Python functions here are bound from
:mod:`reptile_fused.backends.op_table`: the signatures of
:mod:`reptile_fused.reference`, the shared argument checks, and each scalar that may
be a tensor (``lr``, ``meta_lr``, ``n``, ``step``) mapped onto the op's ``float`` +
``Tensor?`` pair.

When the extension is missing or was built against another torch, this module still
imports: :func:`unavailable_reason` says why and how to build it, and a single
warning announces that the reference ops are used instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

from ..op_table import OP_NAMES, OPS, bind

__all__ = [*OP_NAMES, "unavailable_reason", "build_info"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "in the source tree, with a C++ compiler and, for CUDA kernels, a CUDA toolkit (CUDA_HOME or nvcc on PATH)"
)


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def _flavour(cuda_version: str | None) -> str:
    """The local-label suffix of the wheel that fits this CUDA version (see setup.py)."""
    return "cpu" if cuda_version is None else "cu" + "".join(cuda_version.split(".")[:2])


def _mismatch(info: object) -> str | None:
    """Why the library recorded by ``info`` must not be loaded into this torch, or None.

    A library built against another torch release can fail to resolve symbols, or
    resolve them to code with another layout and crash the interpreter, so the
    check happens before loading it."""
    built_torch = str(getattr(info, "TORCH_VERSION", "unknown"))
    built_cuda = getattr(info, "CUDA_VERSION", None) if getattr(info, "WITH_CUDA", False) else None
    here_torch, here_cuda = torch.__version__, torch.version.cuda
    built = f"torch {built_torch}" + (f" with CUDA {built_cuda} kernels" if built_cuda else " (CPU kernels only)")
    here = f"torch {here_torch}" + (f" (CUDA {here_cuda})" if here_cuda else " (a CPU-only build)")
    if _base_version(built_torch) != _base_version(here_torch):
        problem = "another torch release"
    elif built_cuda is not None and here_cuda is None:
        problem = "CUDA kernels, which need a CUDA build of torch"
    elif built_cuda is not None and built_cuda.split(".")[0] != here_cuda.split(".")[0]:
        problem = "another major CUDA version"
    else:
        return None
    wanted = f"+torch{_base_version(here_torch)}.{_flavour(here_cuda)}"
    return (
        f"the C++/CUDA extension reptile_fused._C was built for {built} but {here} is installed: {problem}, "
        f"so it was not loaded. Either install the torch it was built for (pip install torch=={_base_version(built_torch)}), "
        f"or install the reptile-fused wheel built for this torch (its version ends in {wanted}), "
        f"or {BUILD_HINT}"
    )


def _load() -> tuple[object | None, str | None]:
    """(the build record, None) once the library is loaded, else (record or None, why not)."""
    try:
        info = importlib.import_module("reptile_fused._build_info")
    except ImportError:
        info = None
    except Exception as exc:  # a damaged record must not stop `import reptile_fused`
        return None, f"the build record reptile_fused/_build_info.py cannot be read ({exc!r}); {BUILD_HINT}"
    if info is None:
        if importlib.util.find_spec("reptile_fused._C") is not None:
            # Every build writes the record next to the library; without it the
            # torch it was built for is unknown, and loading could crash.
            return None, (
                "reptile_fused._C has no build record (reptile_fused/_build_info.py), so the torch it was "
                f"built for cannot be checked and it was not loaded; {BUILD_HINT}"
            )
        return None, f"the C++/CUDA extension reptile_fused._C is not built; {BUILD_HINT}"
    mismatch = _mismatch(info)
    if mismatch is not None:
        return info, mismatch
    try:
        importlib.import_module("reptile_fused._C")
    except ImportError as exc:  # not built, built for another platform, or a missing shared library
        return info, f"the C++/CUDA extension reptile_fused._C failed to load ({exc}); {BUILD_HINT}"
    except Exception as exc:  # e.g. OSError from the dynamic loader
        return info, f"the C++/CUDA extension reptile_fused._C failed to load ({exc!r}); {BUILD_HINT}"
    return info, None


_BUILD_INFO, _LOAD_ERROR = _load()
if _LOAD_ERROR is not None:
    # This module is imported once (the backend seam caches it), so this fires once.
    warnings.warn(f"reptile_fused: using the reference PyTorch ops: {_LOAD_ERROR}", RuntimeWarning, stacklevel=2)


def build_info() -> dict[str, object] | None:
    """What the loaded extension was built against (torch/CUDA versions, archs), or None."""
    if _BUILD_INFO is None:
        return None
    return {k: v for k, v in vars(_BUILD_INFO).items() if k.isupper()}


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library registered a kernel of every op for ``device_type`` (``"cpu"``/``"cuda"``)."""
    if _LOAD_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"reptile_fused::{op}", key) for op in OP_NAMES
    )


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if has_kernel(device.type):
        return None
    if device.type == "cuda":
        return f"the C++/CUDA extension was built without CUDA kernels (no CUDA toolkit at build time); {BUILD_HINT}"
    return f"the C++/CUDA extension has no kernels for {device.type} devices (only CPU and CUDA)"


def _kernel(name: str):
    # Looked up at call time: the ops exist only once the library is loaded.
    return lambda *args: getattr(torch.ops.reptile_fused, name)(*args)


for _op in OPS:
    globals()[_op.name] = bind(_op, _kernel(_op.name))
del _op


def _register_fakes() -> None:
    """Shape-only implementations, so the ops trace under torch.compile / FakeTensor.
    Every op mutates its buffers in place and returns nothing."""

    def _nothing(*args, **kwargs) -> None:
        return None

    for op in OP_NAMES:
        torch.library.register_fake(f"reptile_fused::{op}")(_nothing)


if _LOAD_ERROR is None:
    _register_fakes()
