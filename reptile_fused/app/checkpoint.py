"""Run checkpoints, written atomically: a crash mid-write never leaves a broken checkpoint.

On load a checkpoint is checked before anything uses it: its zip archive's CRCs (so
bytes changed after writing are found), the entries a run checkpoint holds and their
types, its settings, and that its weights and optimizer state are finite.  Every
problem is a :class:`CheckpointError` of one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

FORMAT = "reptile-fused-run"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _crc32_on():
    """torch.save writes each record's CRC-32 unless configured not to; load checks them."""
    config = getattr(getattr(getattr(torch.utils, "serialization", None), "config", None), "save", None)
    if config is None or not hasattr(config, "compute_crc32"):
        yield
        return
    before = config.compute_crc32
    config.compute_crc32 = True
    try:
        yield
    finally:
        config.compute_crc32 = before


class CheckpointWriteError(RuntimeError):
    """The checkpoint could not be written (a full disk, ...); the file at ``path`` is as it was."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path} ({reason})")
        self.path = path
        self.reason = reason


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed, then renamed over ``path``.

    An ``OSError`` on the way (no space left, ...) leaves ``path`` as it was, removes the
    temporary file and raises :class:`CheckpointWriteError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f, _crc32_on():
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointWriteError(path, exc.strerror or os.strerror(exc.errno or errno.EIO)) from None
    except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError
        raise CheckpointWriteError(path, _first_sentence(exc)) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
    _fsync_dir(path.parent)


class CheckpointError(ValueError):
    """A file that is not a readable run checkpoint; the message is one line."""


# reptile-fused only ever replaces a checkpoint with a complete one, so a damaged file
# was damaged afterwards (a partial copy, a full disk, ...): it cannot be repaired.
_DAMAGED = "it cannot be loaded: restore a good copy of it, or delete it and train again"
DAMAGED_ADVICE = _DAMAGED


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def load(path) -> dict:
    """A run checkpoint (tensors on the CPU), checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint is empty (0 bytes), so truncated or corrupt; {_DAMAGED}")
    # torch.save writes a zip archive, whose directory is at its end: a truncated file has none.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: the checkpoint is truncated or corrupt (not a complete torch.save "
                              f"archive, {size:,} bytes); {_DAMAGED}")
    _check_crcs(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            # A sound file holding Python objects that checkpoints never contain.  (torch
            # advises weights_only=False: that would run code from the file.)
            raise CheckpointError(f"{path}: not a reptile-fused run checkpoint (it holds Python objects a "
                                  "checkpoint never contains; it was not loaded)") from None
        raise CheckpointError(f"{path}: the checkpoint is corrupt (its pickled data cannot be read); {_DAMAGED}") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: the checkpoint is truncated or corrupt ({_first_sentence(exc)}); "
                              f"{_DAMAGED}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a reptile-fused run checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')}, this reptile-fused reads {VERSION}")
    check_entries(ckpt, path)
    return ckpt


def _check_crcs(path: Path) -> None:
    """Every record of the archive against the CRC-32 written with it."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as exc:  # zipfile raises several types for a damaged archive
        raise CheckpointError(f"{path}: the checkpoint is corrupt ({_first_sentence(exc)}); {_DAMAGED}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: the checkpoint is corrupt (its record {bad} does not match the checksum "
                              f"written with it: its bytes changed after it was written); {_DAMAGED}")


# The entries of a run checkpoint and the types they must have.
_ENTRIES = {
    "config": dict, "model_spec": dict, "model": dict, "optimizer": dict, "iteration": int, "rng": dict,
    "loss_sum": (int, float), "loss_count": int, "elapsed_s": (int, float),
}


def _tensors(obj, prefix: str = ""):
    """``(name, tensor)`` for every tensor inside nested dicts and lists."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def check_entries(ckpt: dict, path) -> None:
    """The entries a run checkpoint holds, of the right types, with valid settings and
    finite weights and optimizer state; else a one-line :class:`CheckpointError`."""
    from .config import TrainConfig

    for key, kind in _ENTRIES.items():
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a complete run checkpoint (it has no {key!r} entry); {_DAMAGED}")
        value = ckpt[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: its {key!r} entry is a {type(value).__name__}, not a "
                                  f"{getattr(kind, '__name__', 'number')}; {_DAMAGED}")
    rng = ckpt["rng"]
    if not all(isinstance(rng.get(k), Tensor) and rng[k].dtype == torch.uint8 for k in ("train", "eval")):
        raise CheckpointError(f"{path}: its 'rng' entry does not hold the two generator states; {_DAMAGED}")
    bad_model = [k for k, v in ckpt["model"].items() if not isinstance(v, Tensor)]
    if bad_model:
        raise CheckpointError(f"{path}: its weight {bad_model[0]!r} is not a tensor; {_DAMAGED}")
    try:
        TrainConfig.from_dict(ckpt["config"]).validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its settings are not valid ({exc}); {_DAMAGED}") from None
    if ckpt["iteration"] < 0 or ckpt["iteration"] > ckpt["config"]["meta_iters"]:
        raise CheckpointError(f"{path}: its iteration {ckpt['iteration']} is outside 0..{ckpt['config']['meta_iters']}; "
                              f"{_DAMAGED}")
    for what, entry in (("weight", ckpt["model"]), ("optimizer state", ckpt["optimizer"].get("state", {}))):
        for name, t in _tensors(entry):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(
                    f"{path}: its {what} {name} holds nan or inf: the run had diverged when it was written, so "
                    "evaluating it would score chance and resuming it would carry the nan on; start a new run with a "
                    "smaller --learning-rate or --meta-step"
                )
    if not math.isfinite(ckpt["loss_sum"]):
        raise CheckpointError(f"{path}: its running loss is {ckpt['loss_sum']} (the run had diverged when it was "
                              "written); start a new run with a smaller --learning-rate or --meta-step")
