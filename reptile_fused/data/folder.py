"""Bring-your-own data: a folder of class sub-folders of images.

Either ``root/<class>/*.{png,jpg,...}`` (the classes are split into train and test
with a fixed seed), or ``root/train/<class>/...`` and ``root/test/<class>/...``
(optionally ``root/val/...``) when the split is already made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DatasetError
from .images import ImageClasses, list_images, list_subdirs, require_dir

SPLIT_NAMES = ("train", "val", "test")


def _classes(folder: Path) -> tuple[list[str], list[list[Path]]]:
    dirs = list_subdirs(folder)
    if not dirs:
        raise DatasetError(f"{folder}: no class folders; expected {folder}/<class>/<image files>")
    files = []
    for d in dirs:
        imgs = list_images(d)
        if not imgs:
            raise DatasetError(f"{d}: no image files; expected .png/.jpg/... images of this class")
        files.append(imgs)
    return [str(d) for d in dirs], files


def is_presplit(root: Path) -> bool:
    names = {d.name for d in list_subdirs(root)}
    return {"train", "test"} <= names and names <= set(SPLIT_NAMES)


def load_folder(root, image_size: int, channels: int, train_fraction: float = 0.8,
                split_seed: int = 0) -> dict[str, ImageClasses]:
    """``{"train": ..., "test": ...}`` (and ``"val"`` when pre-split) image classes (uint8, CPU)."""
    root = require_dir(Path(root), "a folder of class sub-folders of images")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if is_presplit(root):
        out = {}
        for split in SPLIT_NAMES:
            if (root / split).is_dir():
                names, files = _classes(root / split)
                out[split] = ImageClasses.from_class_lists(files, names, image_size, channels)
        return out
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    names, files = _classes(root)
    if len(names) < 2:
        raise DatasetError(f"{root}: {len(names)} class folder; expected at least 2 to split into train and test")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_train = min(max(1, int(round(len(names) * train_fraction))), len(names) - 1)
    parts = {"train": order[:n_train], "test": order[n_train:]}
    return {
        split: ImageClasses.from_class_lists([files[i] for i in idx], [names[i] for i in idx], image_size, channels)
        for split, idx in parts.items()
    }
