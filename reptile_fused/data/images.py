"""Image classes held as one uint8 tensor, so a task is a gather on the training device.

Every image of every class lives in ``images[N, C, H, W]`` (uint8, on the device);
class ``b`` owns rows ``offsets[b]:offsets[b+1]``.  Rotation augmentation adds
*virtual* classes (class id = base * len(rotations) + r) that are rotated after the
gather, so Omniglot's four-fold augmentation costs no memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a declared dependency
        raise DatasetError("reading image datasets needs Pillow: pip install pillow") from exc
    return Image


def list_images(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def list_subdirs(folder: Path) -> list[Path]:
    """The sub-folders of ``folder``, sorted by name (hidden ones skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: not found; expected {what}")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory; expected {what}")
    return path


def load_image(path: Path, size: int, channels: int) -> Tensor:
    """One image as uint8 ``[channels, size, size]``.

    Resized in the file's own mode before any conversion, as the authors' loaders do:
    Omniglot's 1-bit PNGs are therefore resized nearest-neighbour and stay binary.
    """
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            if img.size != (size, size):
                img = img.resize((size, size))
            img = img.convert("L" if channels == 1 else "RGB")
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except DatasetError:
        raise
    except Exception as exc:  # PIL raises many types for a bad file
        raise DatasetError(f"{path}: cannot read image ({exc}); expected an image file") from exc
    return data.view(size, size, channels).permute(2, 0, 1).contiguous()


def load_images(paths: list[Path], size: int, channels: int) -> Tensor:
    """All ``paths`` stacked into uint8 ``[N, channels, size, size]``, decoded on a few threads."""
    out = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)
    if not paths:
        return out

    def work(i):
        out[i] = load_image(paths[i], size, channels)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        # list() re-raises the first worker's exception here.
        list(pool.map(work, range(len(paths))))
    return out


@dataclass
class ImageClasses:
    """A set of image classes ready for few-shot sampling.

    ``names[b]`` says where base class ``b`` comes from (its folder, or csv and label),
    so error messages can name the path.
    ``rotations`` holds quarter turns; ``(0,)`` means no augmentation.
    """

    images: Tensor
    offsets: Tensor
    names: list[str]
    rotations: tuple[int, ...] = (0,)
    _counts: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        self.offsets = torch.as_tensor(self.offsets, dtype=torch.int64, device="cpu")
        if self.offsets.numel() != len(self.names) + 1 or int(self.offsets[-1]) != self.images.shape[0]:
            raise ValueError("offsets must have one entry per class plus the total image count")
        if not self.rotations or any(r not in (0, 1, 2, 3) for r in self.rotations):
            raise ValueError(f"rotations must be quarter turns in 0..3, got {self.rotations}")
        self._counts = self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_class_lists(cls, per_class: list[list[Path]], names: list[str], size: int, channels: int,
                         rotations=(0,)) -> ImageClasses:
        paths = [p for files in per_class for p in files]
        offsets = [0]
        for files in per_class:
            offsets.append(offsets[-1] + len(files))
        return cls(load_images(paths, size, channels), torch.tensor(offsets), list(names), tuple(rotations))

    @property
    def num_base_classes(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """Classes as the sampler sees them: every base class in every rotation."""
        return len(self.names) * len(self.rotations)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def count(self, base: int) -> int:
        return int(self._counts[base])

    def counts(self) -> Tensor:
        return self._counts

    def to(self, device) -> ImageClasses:
        return ImageClasses(self.images.to(device), self.offsets, self.names, self.rotations)

    def class_name(self, class_id: int) -> str:
        base, r = divmod(class_id, len(self.rotations))
        rot = self.rotations[r]
        return self.names[base] + (f" (rotated {90 * rot} deg)" if rot else "")

    def subset(self, bases: list[int], rotations=None) -> ImageClasses:
        """The given base classes (in that order), optionally with other rotations."""
        rows = [torch.arange(int(self.offsets[b]), int(self.offsets[b + 1])) for b in bases]
        index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + r.numel())
        return ImageClasses(
            self.images[index.to(self.images.device)],
            torch.tensor(offsets),
            [self.names[b] for b in bases],
            tuple(self.rotations if rotations is None else rotations),
        )
