"""The functional API of the original sketch, ``reptile_train`` and ``reptile_adapt``, on ``ReptileOptimizer``."""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .optimizer import ReptileOptimizer

Task = tuple[Tensor, Tensor, Tensor, Tensor]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inner_loop(model: nn.Module, opt: ReptileOptimizer, x: Tensor, y: Tensor, steps: int, loss_fn) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


@torch.no_grad()
def _query_metrics(model: nn.Module, x: Tensor, y: Tensor, loss_fn) -> dict[str, float]:
    was_training = model.training
    model.eval()
    out = model(x)
    metrics = {"query_loss": float(loss_fn(out, y))}
    if not y.is_floating_point() and out.dim() == 2:
        metrics["query_acc"] = float((out.argmax(1) == y).float().mean())
    model.train(was_training)
    return metrics


def reptile_train(
    model: nn.Module,
    task_sampler: Iterator[Task] | Iterable[Task],
    meta_lr: float = 1.0,
    inner_lr: float = 0.01,
    inner_steps: int = 5,
    num_iterations: int = 10000,
    device: str | torch.device | None = None,
    meta_batch_size: int = 1,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    inner_optimizer: str = "sgd",
    backend: str = "auto",
    log_interval: int = 500,
    log: Callable[[int, dict[str, float]], None] | None = None,
    **optimizer_kwargs,
) -> nn.Module:
    """Meta-train ``model`` with Reptile; the arguments of the original sketch, same defaults.

    ``task_sampler`` yields ``(support_x, support_y, query_x, query_y)``.  Each
    iteration adapts to ``meta_batch_size`` tasks for ``inner_steps`` steps on their
    support sets, then takes one meta step.  Every ``log_interval`` iterations the
    query loss (and accuracy, for class labels) is measured *after* adapting to the
    first task's support set — the meta-weights alone classify permuted labels at
    chance — and passed to ``log`` (default: printed).  ``device`` defaults to CUDA
    when it is available, else the CPU.  Extra keyword arguments go to
    :class:`ReptileOptimizer` (``momentum``, ``betas``, ...).  Returns ``model``.
    """
    if meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
    if inner_steps < 0 or num_iterations < 0:
        raise ValueError("inner_steps and num_iterations must be >= 0")
    device = torch.device(device or default_device())
    model = model.to(device)
    sampler = iter(task_sampler)
    opt = ReptileOptimizer(
        model.parameters(),
        inner_optimizer=inner_optimizer,
        lr=inner_lr,
        meta_lr=meta_lr,
        backend=backend,
        **optimizer_kwargs,
    )
    log = log or (lambda it, m: print(f"Iteration {it}: " + ", ".join(f"{k} = {v:.4f}" for k, v in m.items())))
    for iteration in range(num_iterations):
        logging = log_interval > 0 and iteration % log_interval == 0
        for t in range(meta_batch_size):
            support_x, support_y, query_x, query_y = (v.to(device) for v in next(sampler))
            with opt.task():
                _inner_loop(model, opt, support_x, support_y, inner_steps, loss_fn)
                if logging and t == 0:
                    metrics = _query_metrics(model, query_x, query_y, loss_fn)
        opt.meta_step()
        if logging:
            log(iteration, metrics)
    return model


def reptile_adapt(
    model: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: float = 0.01,
    inner_steps: int = 10,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    inner_optimizer: str = "sgd",
    backend: str = "auto",
    **optimizer_kwargs,
) -> nn.Module:
    """Adapt a copy of ``model`` to one task's support set; ``model`` itself is untouched.

    The copy is trained in ``train()`` mode and returned in ``eval()`` mode, as in the sketch.
    """
    adapted = copy.deepcopy(model)
    adapted.train()
    opt = ReptileOptimizer(
        adapted.parameters(), inner_optimizer=inner_optimizer, lr=inner_lr, backend=backend, **optimizer_kwargs
    )
    _inner_loop(adapted, opt, support_x, support_y, inner_steps, loss_fn)
    adapted.eval()
    return adapted
