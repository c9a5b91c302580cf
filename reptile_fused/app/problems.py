"""What a meta-learning run learns: a source of training tasks and of evaluation tasks.

A problem hides the difference between classification (image datasets) and the
sine-wave regression: both hand out ``(x, y)`` training tasks and
:class:`~reptile_fused.data.Task` evaluation tasks on the training device, and
both say how to score query predictions.  All randomness is drawn from the CPU
generator passed in.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig
from ..data import (
    ImageClasses,
    SineTasks,
    Task,
    TaskSampler,
        load_folder,
    load_miniimagenet,
    load_omniglot,
)
from ..models import model_spec

SINE_QUERY_POINTS = 100


class ClassificationProblem:
    kind = "classification"
    metric = "acc"

    def __init__(self, splits: dict[str, ImageClasses], ways: int, train_shots: int, shots: int,
                 device: torch.device, root: str = "dataset", train_split: str | None = "train",
                 eval_splits=("train", "test")):
        """``train_split=None`` makes an evaluation-only problem (no training tasks)."""
        self.ways = ways
        self.device = device
        for s in [train_split, *eval_splits]:
            if s is not None and s not in splits:
                raise ValueError(f"{root}: no {s!r} split; this dataset has {', '.join(splits)}")
        used = {s for s in [train_split, *eval_splits] if s is not None}
        self.splits = {name: c.to(device) for name, c in splits.items() if name in used}
        self.train_split = train_split
        self.eval_splits = list(eval_splits)
        self.image_shape = next(iter(self.splits.values())).image_shape
        # The tasks' samplers check that every split is big enough for its tasks;
        # evaluation tasks take one extra example per class as the query.
        self._train = (TaskSampler(self.splits[train_split], ways, train_shots, what=f"{root} ({train_split} split)")
                       if train_split is not None else None)
        self._eval = {s: TaskSampler(self.splits[s], ways, shots, 1, what=f"{root} ({s} split)")
                      for s in self.eval_splits}

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def train_task(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        self._train.generator = generator
        t = self._train.sample()
        return t.support_x, t.support_y

    def eval_task(self, split: str, generator: torch.Generator) -> Task:
        if split not in self._eval:
            raise ValueError(f"no {split!r} split here; have {', '.join(self._eval)}")
        sampler = self._eval[split]
        sampler.generator = generator
        return sampler.sample()

    def score(self, out: Tensor, y: Tensor) -> float:
        """Fraction of correct query predictions."""
        return int((out.argmax(-1) == y).sum()) / y.numel()

    def fingerprint(self) -> dict[str, str]:
        """Per split, a digest of its classes' image counts and every image's pixel sum:
        equal for the same images in the same classes, wherever the folder is."""
        out = {}
        for name, c in sorted(self.splits.items()):
            h = hashlib.sha256()
            h.update(repr((tuple(c.images.shape), c.rotations)).encode())
            h.update(c.offsets.numpy().tobytes())
            h.update(c.images.reshape(c.images.shape[0], -1).sum(1, dtype=torch.int64).cpu().numpy().tobytes())
            out[name] = h.hexdigest()
        return out


class SineProblem:
    kind = "regression"
    metric = "mse"

    def __init__(self, train_shots: int, shots: int, device: torch.device):
        self.tasks = SineTasks()
        self.train_shots = train_shots
        self.shots = shots
        self.device = device
        self.eval_splits = ["test"]

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y)

    def train_task(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.tasks.sample(generator).sample(self.train_shots, generator, self.device)

    def eval_task(self, split: str, generator: torch.Generator) -> Task:
        """``shots`` support points and a dense, evenly spaced query over [-5, 5]."""
        wave = self.tasks.sample(generator)
        sx, sy = wave.sample(self.shots, generator, self.device)
        qx = torch.linspace(-5, 5, SINE_QUERY_POINTS, dtype=torch.float64).unsqueeze(1)
        qy = wave(qx)
        return Task(sx, sy, qx.float().to(self.device), qy.float().to(self.device))

    def score(self, out: Tensor, y: Tensor) -> float:
        return float(F.mse_loss(out, y))

    def fingerprint(self) -> None:
        return None  # generated waves: no data to tell apart


def load_splits(config: TrainConfig) -> tuple[dict[str, ImageClasses], str, list[str]]:
    """The dataset's splits, the training split's name and the splits to evaluate during training."""
    root = config.data_root
    if config.dataset == "omniglot":
        return load_omniglot(root, split=config.split, split_seed=config.split_seed,
                             image_size=config.image_size or 28), "train", ["train", "test"]
    if config.dataset == "miniimagenet":
        # Validation classes, not test classes, steer a run while it trains.
        return load_miniimagenet(root, image_size=config.image_size or 84), "train", ["train", "val"]
    if config.dataset == "folder":
        splits = load_folder(root, image_size=config.image_size or 84, channels=config.channels or 3,
                             train_fraction=config.train_fraction, split_seed=config.split_seed)
        return splits, "train", ["train", "val" if "val" in splits else "test"]
    raise ValueError(f"not an image dataset: {config.dataset}")


def build_problem(config: TrainConfig, device: torch.device, eval_only: str | None = None):
    """The problem for ``config`` and its model spec.

    ``eval_only`` names a split: then only that split is checked and sampled (for ``eval``).
    """
    if config.dataset == "sine":
        return SineProblem(config.effective_train_shots, config.shots, device), model_spec("sine", 1)
    splits, train_split, eval_splits = load_splits(config)
    if eval_only is not None:
        train_split, eval_splits = None, [eval_only]
    problem = ClassificationProblem(splits, config.classes, config.effective_train_shots, config.shots,
                                    device, root=str(config.data_root), train_split=train_split,
                                    eval_splits=eval_splits)
    spec = model_spec(config.dataset, config.classes, problem.image_shape, config.model)
    return problem, spec
