"""N-way K-shot tasks drawn from :class:`ImageClasses`, and the authors' inner mini-batches.

All randomness comes from one CPU ``torch.Generator``: indices are drawn on the host
(a few dozen numbers per task) and the images are gathered where they live, so the
same seed gives the same tasks on every device and a checkpoint can store the
generator's state to resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DatasetError
from .images import ImageClasses


@dataclass
class Task:
    """A few-shot task; ``*_x`` are float images in [0, 1], ``*_y`` int64 labels 0..ways-1.

    Examples are class-major: the first ``shots`` rows are label 0, and so on.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device) -> Task:
        return Task(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


def check_enough(classes: ImageClasses, ways: int, per_class: int, what: str) -> None:
    """Raise a :class:`DatasetError` unless ``classes`` can supply ``ways`` x ``per_class`` tasks."""
    if ways < 1 or per_class < 1:
        raise ValueError(f"ways and examples per class must be >= 1, got {ways} and {per_class}")
    if classes.num_classes < ways:
        raise DatasetError(
            f"{what}: {classes.num_classes} classes, but {ways}-way tasks need at least {ways}"
        )
    counts = classes.counts()
    small = (counts < per_class).nonzero().flatten().tolist()
    if small:
        b = small[0]
        more = f" (and {len(small) - 1} more classes)" if len(small) > 1 else ""
        raise DatasetError(
            f"{classes.names[b]}: {int(counts[b])} images, but tasks need {per_class} per class{more}"
        )


class TaskSampler:
    """Draws ``ways``-way tasks with ``shots`` support and ``queries`` query examples per class.

    Which class gets which label is random per task, so no class owns an output unit.
    """

    def __init__(self, classes: ImageClasses, ways: int, shots: int, queries: int = 0,
                 generator: torch.Generator | None = None, what: str = "dataset"):
        check_enough(classes, ways, shots + queries, what)
        self.classes = classes
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.generator = generator if generator is not None else torch.Generator()

    def sample(self, dtype: torch.dtype = torch.float32) -> Task:
        c = self.classes
        g = self.generator
        per = self.shots + self.queries
        chosen = torch.randperm(c.num_classes, generator=g)[: self.ways].tolist()
        nrot = len(c.rotations)
        rows = torch.empty((self.ways, per), dtype=torch.int64)
        turns = []
        for label, cid in enumerate(chosen):
            base, r = divmod(cid, nrot)
            pick = torch.randperm(c.count(base), generator=g)[:per]
            rows[label] = pick + int(c.offsets[base])
            turns.append(c.rotations[r])
        x = c.images[rows.flatten().to(c.device)].to(dtype).div_(255.0)
        x = x.view(self.ways, per, *x.shape[1:])
        for label, k in enumerate(turns):
            if k:
                x[label] = torch.rot90(x[label], k, dims=(-2, -1))
        y = torch.arange(self.ways, device=c.device).unsqueeze(1).expand(self.ways, per)
        s = self.shots
        return Task(
            x[:, :s].reshape(-1, *x.shape[2:]), y[:, :s].reshape(-1),
            x[:, s:].reshape(-1, *x.shape[2:]), y[:, s:].reshape(-1),
        )


def inner_batches(n: int, batch_size: int, num_batches: int, generator: torch.Generator) -> Tensor:
    """Indices ``[num_batches, batch_size]`` of mini-batches over ``n`` examples, as the authors draw them.

    The examples are reshuffled every pass and a batch may straddle two passes, so a
    batch larger than ``n`` simply holds some examples twice.  One tensor, so it
    reaches the device in one copy.
    """
    if n < 1 or batch_size < 1 or num_batches < 0:
        raise ValueError(f"need n >= 1, batch_size >= 1, num_batches >= 0; got {n}, {batch_size}, {num_batches}")
    total = batch_size * num_batches
    passes = -(-total // n)
    if passes == 0:
        return torch.zeros((0, batch_size), dtype=torch.int64)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return order[:total].view(num_batches, batch_size)
