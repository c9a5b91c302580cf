"""Mini-ImageNet in Ravi & Larochelle's layout: ``images/`` plus ``train.csv``,
``val.csv`` and ``test.csv``, each a ``filename,label`` table with a header row."""

from __future__ import annotations

import csv
from pathlib import Path

from .errors import DatasetError
from .images import ImageClasses, require_dir

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84


def _read_csv(path: Path, images: Path) -> tuple[list[str], list[list[Path]]]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; expected a filename,label table for this split")
    by_label: dict[str, list[Path]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0]] != ["filename", "label"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise DatasetError(f"{path}: header is {got!r}; expected 'filename,label'")
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DatasetError(f"{path}:{lineno}: {len(row)} columns; expected filename,label")
        name, label = row[0].strip(), row[1].strip()
        file = images / name
        if not file.is_file():
            raise DatasetError(f"{file}: listed in {path.name}:{lineno} but not found")
        by_label.setdefault(label, []).append(file)
    if not by_label:
        raise DatasetError(f"{path}: no rows; expected one filename,label row per image")
    labels = sorted(by_label)
    return labels, [by_label[label] for label in labels]


def load_miniimagenet(root, splits=SPLITS, image_size: int = IMAGE_SIZE) -> dict[str, ImageClasses]:
    """``{"train": ..., "val": ..., "test": ...}`` RGB image classes (uint8, CPU)."""
    root = require_dir(Path(root), "a Mini-ImageNet folder holding images/ and train.csv, val.csv, test.csv")
    images = require_dir(root / "images", "the folder of Mini-ImageNet images named in the csv files")
    out = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown Mini-ImageNet split {split!r}; choose from {', '.join(SPLITS)}")
        labels, files = _read_csv(root / f"{split}.csv", images)
        names = [f"{root / f'{split}.csv'} (label {label})" for label in labels]
        out[split] = ImageClasses.from_class_lists(files, names, image_size, 3)
    return out
