"""Small regression tasks and the plain Reptile loop that several tests drive an optimizer with."""

import torch
import torch.nn.functional as F


def make_tasks(n_iters, meta_batch, inner_steps, seed=1, dtype=torch.float32, rows=6):
    """``tasks[iteration][task]``: ``inner_steps`` batches ``(x [rows, 3], y [rows, 2])``."""
    g = torch.Generator().manual_seed(seed)
    return [
        [[(torch.randn(rows, 3, generator=g, dtype=dtype), torch.randn(rows, 2, generator=g, dtype=dtype))
          for _ in range(inner_steps)]
         for _ in range(meta_batch)]
        for _ in range(n_iters)
    ]


def train(model, opt, tasks):
    """Every task adapts inside ``opt.task()``, one MSE step per batch; one meta step per iteration."""
    for meta_batch in tasks:
        for task in meta_batch:
            with opt.task():
                for x, y in task:
                    opt.zero_grad()
                    F.mse_loss(model(x), y).backward()
                    opt.step()
        opt.meta_step()
