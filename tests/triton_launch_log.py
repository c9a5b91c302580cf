"""A launch recorder for the Triton backend: which kernels a test run would compile.

Triton compiles a kernel once per *specialisation*: its constexpr arguments, each
tensor's dtype and 16-byte alignment, each specialised integer's type and whether it
is 1 or a multiple of 16 (arguments listed in ``do_not_specialize`` keep only their
type), and the launch configuration.  :func:`compile_key` computes that key from a
launch the way Triton does, so counting distinct keys over a run on the CPU (the
interpreter, where nothing is compiled) tells how many compiles the same launches
cost on a GPU.

As a pytest plugin (``-p triton_launch_log``, with ``tests/`` on ``sys.path``) it
wraps the launchers of ``reptile_fused.backends.triton.kernels`` when
``REPTILE_FUSED_TRITON_LAUNCH_LOG`` names a file, and appends one JSON line per new
key.  With ``REPTILE_FUSED_TRITON_RECORD_ONLY=1`` the kernels are not run at all
(the tests then fail, which does not matter: only the launches are wanted).
"""

from __future__ import annotations

import inspect
import json
import os

LOG_ENV = "REPTILE_FUSED_TRITON_LAUNCH_LOG"
RECORD_ONLY_ENV = "REPTILE_FUSED_TRITON_RECORD_ONLY"


def _int_spec(value: int, specialise: bool) -> tuple:
    kind = "i32" if -(2**31) <= value < 2**31 else "i64"
    if not specialise:
        return (kind,)
    return (kind, "one" if value == 1 else "div16" if value % 16 == 0 else "")


def compile_key(raw, args: tuple, consts: dict, config: tuple) -> tuple:
    """Triton's specialisation key of one launch of ``raw`` (a ``@triton.jit`` kernel, or
    its interpreted twin) with positional ``args``, constexpr ``consts`` and launch
    ``config`` (block, warps)."""
    fn = getattr(raw, "fn", raw)
    params = list(inspect.signature(fn).parameters.values())
    dns = getattr(raw, "do_not_specialize", None)
    if dns is None:
        dns = getattr(raw, "kwargs", {}).get("do_not_specialize") or ()
    unspecialised = {params[i].name if isinstance(i, int) else i for i in dns}
    annotations = getattr(fn, "__annotations__", {})
    key = []
    for param, value in zip(params, args):
        if value is None:
            key.append((param.name, None))
        elif hasattr(value, "data_ptr"):
            key.append((param.name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            key.append((param.name, "u1"))
        elif isinstance(value, int):
            if "int64" in str(annotations.get(param.name, "")):
                spec = ("i64",) if param.name in unspecialised else ("i64",) + _int_spec(value, True)[1:]
            else:
                spec = _int_spec(value, param.name not in unspecialised)
            key.append((param.name, *spec))
        elif isinstance(value, float):
            key.append((param.name, "fp32"))
        else:
            key.append((param.name, type(value).__name__))
    return (fn.__name__, tuple(key), tuple(sorted((k, repr(v)) for k, v in consts.items())), config)


class Recorder:
    """Wraps ``kernels._launch``; keeps every distinct compile key and autotune key."""

    def __init__(self, kernels, execute: bool = True):
        self.kernels = kernels
        self.execute = execute
        self.compiles: set = set()
        self.tuning_keys: set = set()
        self.launches = 0
        self._real = kernels._launch

    def __call__(self, raw, tuned, n_elements, block, args, consts):
        self.launches += 1
        if block is not None:
            configs = [(block, self.kernels._warps_for(block))]
        else:
            configs = [(b, w) for b, w in self.kernels.TUNE_SPACE]
            if len(configs) > 1:  # Triton benchmarks a key only when it has a choice
                named = dict(zip(inspect.signature(getattr(raw, "fn", raw)).parameters, args))
                self.tuning_keys.add((getattr(raw, "fn", raw).__name__, int(n_elements),
                                      tuple(sorted(consts.items(), key=str)),
                                      tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))))
        for config in configs:
            self.compiles.add(compile_key(raw, args, consts, config))
        if self.execute:
            return self._real(raw, tuned, n_elements, block, args, consts)
        return None

    def install(self, monkeypatch=None) -> Recorder:
        if monkeypatch is not None:
            monkeypatch.setattr(self.kernels, "_launch", self)
        else:
            self.kernels._launch = self
        return self

    def summary(self) -> dict:
        return {"compiles": len(self.compiles), "autotune_keys": len(self.tuning_keys), "launches": self.launches}


_recorder: Recorder | None = None


def pytest_configure(config) -> None:  # the plugin: only with the log file named
    global _recorder
    if not os.environ.get(LOG_ENV):
        return
    try:
        from reptile_fused.backends.triton import kernels
    except ImportError:
        return
    _recorder = Recorder(kernels, execute=os.environ.get(RECORD_ONLY_ENV) != "1").install()


def pytest_unconfigure(config) -> None:
    if _recorder is None:
        return
    with open(os.environ[LOG_ENV], "w") as f:
        json.dump({**_recorder.summary(), "tune_space": [list(c) for c in _recorder.kernels.TUNE_SPACE],
                   "keys": sorted(repr(k) for k in _recorder.compiles)}, f)  # fmt: skip
