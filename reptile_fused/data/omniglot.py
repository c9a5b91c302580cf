"""Omniglot from its standard folders: ``images_background/`` and ``images_evaluation/``,
each holding ``alphabet/character/*.png``.

Two splits:

* ``"authors"`` (default): both folders merged, characters shuffled with a fixed seed,
  the first 1200/1623 of them train (exactly 1200 / 423 on full Omniglot), as in
  Nichol et al.'s code;
* ``"background"``: Lake et al.'s, ``images_background`` trains, ``images_evaluation`` tests.

Training characters get their 90/180/270 degree rotations as extra classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DatasetError
from .images import ImageClasses, list_images, list_subdirs, require_dir

FOLDERS = ("images_background", "images_evaluation")
AUTHORS_TRAIN_FRACTION = 1200 / 1623
IMAGE_SIZE = 28
SPLITS = ("authors", "background")


def _characters(folder: Path) -> list[tuple[str, str, list[Path]]]:
    """(``alphabet/character``, folder path, sorted png paths) for every character under ``folder``."""
    alphabets = list_subdirs(folder)
    if not alphabets:
        raise DatasetError(f"{folder}: no alphabet folders; expected {folder.name}/<alphabet>/<character>/*.png")
    found = []
    for alphabet in alphabets:
        chars = list_subdirs(alphabet)
        if not chars:
            raise DatasetError(f"{alphabet}: no character folders; expected {alphabet}/<character>/*.png")
        for char in chars:
            pngs = list_images(char, suffixes=(".png",))
            if not pngs:
                raise DatasetError(f"{char}: no .png images; expected one image per drawing of this character")
            found.append((f"{alphabet.name}/{char.name}", str(char), pngs))
    return found


def split_sizes(n: int) -> tuple[int, int]:
    """Train/test character counts of the authors' split for ``n`` characters."""
    train = int(round(n * AUTHORS_TRAIN_FRACTION))
    return train, n - train


def load_omniglot(root, split: str = "authors", split_seed: int = 0, image_size: int = IMAGE_SIZE,
                  augment: bool = True) -> dict[str, ImageClasses]:
    """``{"train": ..., "test": ...}`` image classes (uint8, CPU)."""
    root = require_dir(Path(root), "an Omniglot folder holding images_background/ and images_evaluation/")
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}")
    present = [f for f in FOLDERS if (root / f).is_dir()]
    if split == "background":
        for f in FOLDERS:
            require_dir(root / f, f"{f}/<alphabet>/<character>/*.png (the 'background' split needs both folders)")
    elif not present:
        raise DatasetError(
            f"{root}: neither images_background/ nor images_evaluation/ found; "
            f"expected {root}/images_background/<alphabet>/<character>/*.png"
        )
    per_folder = {f: _characters(root / f) for f in present}
    if split == "background":
        train_chars, test_chars = per_folder["images_background"], per_folder["images_evaluation"]
    else:
        # Merge by character name (not folder) so the split does not depend on which
        # release folder a character shipped in.
        merged = sorted((c for f in present for c in per_folder[f]), key=lambda c: c[0])
        order = torch.randperm(len(merged), generator=torch.Generator().manual_seed(split_seed)).tolist()
        n_train, _ = split_sizes(len(merged))
        train_chars = [merged[i] for i in order[:n_train]]
        test_chars = [merged[i] for i in order[n_train:]]
    rotations = (0, 1, 2, 3) if augment else (0,)
    return {
        "train": ImageClasses.from_class_lists([c[2] for c in train_chars], [c[1] for c in train_chars],
                                               image_size, 1, rotations),
        "test": ImageClasses.from_class_lists([c[2] for c in test_chars], [c[1] for c in test_chars],
                                              image_size, 1),
    }
