"""Tiny generated datasets in each supported layout (nothing is downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw


def glyph(seed: int, size: int = 105, jitter: int = 0, salt: int = 0) -> Image.Image:
    """A 1-bit "character": a few random strokes fixed by ``seed``, jittered per drawing."""
    shape = random.Random(seed)
    wobble = random.Random(seed * 7919 + salt)
    img = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        pts = [(shape.randint(10, size - 10) + wobble.randint(-jitter, jitter),
                shape.randint(10, size - 10) + wobble.randint(-jitter, jitter)) for _ in range(3)]
        draw.line(pts, fill=0, width=6)
    return img


def make_omniglot(root: Path, background=(3, 2), evaluation=(2,), drawings: int = 4, size: int = 105) -> Path:
    """``images_background`` with alphabets of ``background[i]`` characters, same for evaluation."""
    seed = 0
    for folder, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for a, n_chars in enumerate(alphabets):
            for c in range(n_chars):
                seed += 1
                d = root / folder / f"{folder[7:]}_alphabet{a}" / f"character{c + 1:02d}"
                d.mkdir(parents=True, exist_ok=True)
                for k in range(drawings):
                    glyph(seed, size, jitter=4, salt=k).save(d / f"{seed:04d}_{k + 1:02d}.png")
    return root


def color_image(label: int, k: int, size: int) -> Image.Image:
    rng = random.Random(label * 1000 + k)
    base = ((label * 67) % 256, (label * 151) % 256, (label * 29) % 256)
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randint(0, size - 8), rng.randint(0, size - 8)
        draw.rectangle([x, y, x + 7, y + 7], fill=(rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    return img


def make_miniimagenet(root: Path, classes=(4, 2, 3), per_class: int = 3, size: int = 40) -> Path:
    """Ravi-style: images/ + train/val/test.csv; ``classes`` counts per split."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    label = 0
    for split, n in zip(("train", "val", "test"), classes):
        rows = ["filename,label"]
        for _ in range(n):
            wnid = f"n{label:08d}"
            for k in range(per_class):
                name = f"{wnid}{k:08d}.jpg"
                color_image(label, k, size).save(root / "images" / name)
                rows.append(f"{name},{wnid}")
            label += 1
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def make_folder(root: Path, classes: int = 6, per_class: int = 4, size: int = 20, presplit=None) -> Path:
    """``root/<class>/*.png`` or, with ``presplit={"train": n, "test": m}``, ``root/<split>/<class>/``."""
    layout = presplit or {None: classes}
    label = 0
    for split, n in layout.items():
        base = root / split if split else root
        for _ in range(n):
            d = base / f"class_{label:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                color_image(label, k, size).save(d / f"img{k}.png")
            label += 1
    return root

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: extra threads only add contention.  CPU
    kernels may also sum in a thread-count-dependent order, so every run compared for
    bit-exactness must use the same count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
