"""The authors' evaluation protocol.

For each task: adapt the meta-learned weights on the support set with ``eval_iters``
mini-batches of ``eval_batch`` examples (the training inner optimizer, its state
included), predict the query, then restore weights *and* inner-optimizer state so
tasks never leak into each other or into training.

Batch norm normalises with batch statistics, so how the query is batched matters:

* transductive: all queries in one batch (they share statistics, so information
  flows between test examples);
* non-transductive (default): each query alone with the whole support set, and
  only its own prediction is kept.

Classification tasks hold one query per class (``shots + 1`` images drawn per
class), as in the authors' code.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..data import Task, inner_batches
from ..optimizer import ReptileOptimizer

Z95 = 1.959963984540054


def adapt(model: nn.Module, opt: ReptileOptimizer, loss_fn: Callable, x: Tensor, y: Tensor,
          batch: int, iters: int, generator: torch.Generator) -> Tensor | None:
    """``iters`` inner steps on mini-batches of ``(x, y)``; returns the summed loss (device tensor)."""
    order = inner_batches(x.shape[0], batch, iters, generator).to(x.device)
    total = None
    for idx in order:
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total = loss.detach() if total is None else total + loss.detach()
    return total


@torch.no_grad()
def predict(model: nn.Module, support_x: Tensor, query_x: Tensor, transductive: bool) -> Tensor:
    if transductive:
        return model(query_x)
    return torch.stack([model(torch.cat([support_x, q.unsqueeze(0)]))[-1] for q in query_x])


class Restorer:
    """Puts the weights and the inner optimizer's state back as they were at creation."""

    def __init__(self, opt: ReptileOptimizer):
        self.opt = opt
        self.weights = [b.data.clone() for b in opt.flat_buffers]
        self.state = opt.state_dict()

    @torch.no_grad()
    def restore(self) -> None:
        for b, w in zip(self.opt.flat_buffers, self.weights):
            b.data.copy_(w)
        self.opt.load_state_dict(self.state)


def evaluate_task(model, opt, problem, task: Task, eval_batch: int, eval_iters: int, transductive: bool,
                  generator: torch.Generator, restorer: Restorer | None = None) -> float:
    """Score (accuracy or MSE) of one task after adaptation; weights and state are restored."""
    restorer = restorer or Restorer(opt)
    was_training = model.training
    try:
        model.train()
        adapt(model, opt, problem.loss, task.support_x, task.support_y, eval_batch, eval_iters, generator)
        model.eval()
        # Without batch norm (the sine MLP) the two protocols coincide; one batch is faster.
        out = predict(model, task.support_x, task.query_x, transductive or problem.kind == "regression")
        return problem.score(out, task.query_y)
    finally:
        restorer.restore()
        model.train(was_training)


def mean_ci95(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% normal confidence interval (None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z95 * math.sqrt(var / n)


def evaluate(model, opt, problem, split: str, num_samples: int, eval_batch: int, eval_iters: int,
             transductive: bool, generator: torch.Generator, progress: bool = False) -> dict:
    """The protocol over ``num_samples`` tasks: ``{metric, "ci95", "tasks"}`` (metric: acc or mse)."""
    if num_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {num_samples}")
    restorer = Restorer(opt)
    scores = []
    bar = _progress(num_samples, progress, f"eval {split}")
    for _ in range(num_samples):
        task = problem.eval_task(split, generator)
        scores.append(evaluate_task(model, opt, problem, task, eval_batch, eval_iters, transductive,
                                    generator, restorer))
        if bar is not None:
            bar.update(1)
            if len(scores) % 20 == 0 or len(scores) == num_samples:
                bar.set_postfix({problem.metric: f"{math.fsum(scores) / len(scores):.4f}"})
    if bar is not None:
        bar.close()
    mean, ci = mean_ci95(scores)
    return {problem.metric: mean, "ci95": ci, "tasks": num_samples}


def _progress(total, enabled, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)
