"""``python -m reptile_fused demo``: a short sine-wave meta-training from the library API."""

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import reptile_adapt, reptile_train


def _sine_tasks(seed, shots=10, queries=50):
    g = torch.Generator().manual_seed(seed)
    while True:
        amplitude = torch.empty(1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(1).uniform_(0.0, 2 * math.pi, generator=g)
        x = torch.empty(shots + queries, 1).uniform_(-5.0, 5.0, generator=g)
        y = amplitude * torch.sin(x + phase)
        yield x[:shots], y[:shots], x[shots:], y[shots:]


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def _mse_after_adaptation(model, tasks, n_tasks=50):
    total = 0.0
    for _ in range(n_tasks):
        sx, sy, qx, qy = next(tasks)
        adapted = reptile_adapt(model, sx, sy, inner_lr=0.02, inner_steps=32, loss_fn=F.mse_loss)
        with torch.no_grad():
            total += F.mse_loss(adapted(qx), qy).item()
    return total / n_tasks


def demo(iterations=3000):
    torch.set_num_threads(1)  # a 1-64-64-1 MLP is too small for intra-op threads
    print(f"meta-training a 1-64-64-1 MLP on sine waves for {iterations} iterations (CPU)...")
    meta = reptile_train(_mlp(0), _sine_tasks(1), meta_lr=0.1, inner_lr=0.02, inner_steps=5,
                         num_iterations=iterations, device="cpu", loss_fn=F.mse_loss, log_interval=500)
    print(f"query MSE after 32 steps on 10 points, from the meta-learned init: {_mse_after_adaptation(meta, _sine_tasks(2)):.3f}")
    print(f"query MSE after 32 steps on 10 points, from a random init:        {_mse_after_adaptation(_mlp(0), _sine_tasks(2)):.3f}")


if __name__ == "__main__":
    if sys.argv[1:] != ["demo"]:
        sys.exit("usage: python -m reptile_fused demo")
    demo()
