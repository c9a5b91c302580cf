"""The paper's toy regression problem: each task is one sine wave y = A sin(x + phi)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, 2.0 * math.pi)
X_RANGE = (-5.0, 5.0)


def _uniform(low: float, high: float, shape, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


@dataclass(frozen=True)
class SineTask:
    """One sine wave; ``x``/``y`` tensors have shape ``[n, 1]`` (a batch of scalar inputs)."""

    amplitude: float
    phase: float

    def __call__(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.sin(x + self.phase)

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """``n`` points with x ~ U[-5, 5]; drawn on the CPU generator so every device sees the same task."""
        x = _uniform(*X_RANGE, (n, 1), generator)
        y = self(x)
        return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


class SineTasks:
    """The task distribution: A ~ U[0.1, 5], phi ~ U[0, 2 pi]."""

    def __init__(self, amplitude=AMPLITUDE_RANGE, phase=PHASE_RANGE):
        self.amplitude = tuple(float(v) for v in amplitude)
        self.phase = tuple(float(v) for v in phase)
        if not self.amplitude[0] <= self.amplitude[1] or not self.phase[0] <= self.phase[1]:
            raise ValueError(f"empty range: amplitude {self.amplitude}, phase {self.phase}")

    def sample(self, generator: torch.Generator) -> SineTask:
        ab = _uniform(0.0, 1.0, (2,), generator)
        a = self.amplitude[0] + float(ab[0]) * (self.amplitude[1] - self.amplitude[0])
        p = self.phase[0] + float(ab[1]) * (self.phase[1] - self.phase[0])
        return SineTask(amplitude=a, phase=p)
