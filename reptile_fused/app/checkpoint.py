"""Run checkpoints, written atomically: a crash mid-write never leaves a broken checkpoint."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

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


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


class CheckpointError(ValueError):
    """A file that is not a readable run checkpoint; the message is one line."""


# reptile-fused only ever replaces a checkpoint with a complete one, so a damaged file
# was damaged afterwards (a partial copy, a full disk, ...): it cannot be repaired.
_DAMAGED = "it cannot be loaded: restore a good copy of it, or delete it and train again"


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
    return ckpt
