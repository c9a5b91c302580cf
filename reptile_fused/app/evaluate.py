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
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data import Task, inner_batches
from ..optimizer import ReptileOptimizer

Z95 = 1.959963984540054


def adapt(model: nn.Module, opt: ReptileOptimizer, loss_fn: Callable, x: Tensor, y: Tensor,
          batch: int, iters: int, generator: torch.Generator | None,
          order: Tensor | list[Tensor] | None = None) -> Tensor | None:
    """``iters`` inner steps on mini-batches of ``(x, y)``; returns the summed loss (device tensor).

    The mini-batches are drawn from ``generator``, unless ``order`` gives them (drawn
    before): a ``[steps, batch]`` tensor, or a list of index tensors when the batches
    differ in size (``--foml-tail``'s last one).
    """
    if order is None:
        order = inner_batches(x.shape[0], batch, iters, generator)
    order = [idx.to(x.device) for idx in order] if isinstance(order, (list, tuple)) else order.to(x.device)
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
                  generator: torch.Generator | None, restorer: Restorer | None = None,
                  order: Tensor | None = None) -> float:
    """Score (accuracy or MSE) of one task after adaptation; weights and state are restored.

    The inner mini-batches come from ``generator``, or from ``order`` when given.
    """
    restorer = restorer or Restorer(opt)
    was_training = model.training
    try:
        model.train()
        adapt(model, opt, problem.loss, task.support_x, task.support_y, eval_batch, eval_iters, generator, order)
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


def draw_task(problem, split: str, eval_batch: int, eval_iters: int, generator: torch.Generator):
    """One evaluation task and its inner mini-batches, drawn as the sequential protocol draws them."""
    task = problem.eval_task(split, generator)
    return task, inner_batches(task.support_x.shape[0], eval_batch, eval_iters, generator)


def uses_one_batch(problem, transductive: bool) -> bool:
    # Without batch norm (the sine MLP) the two protocols coincide; one batch is faster.
    return transductive or problem.kind == "regression"


def score_tasks_batched(adapter, problem, drawn: list, transductive: bool) -> list[float]:
    """Scores of the ``(task, order)`` pairs in ``drawn``, adapted all at once by ``adapter``
    (a :class:`~reptile_fused.batched.BatchedAdapter`)."""
    tasks = [t for t, _ in drawn]
    sx = torch.stack([t.support_x for t in tasks])
    sy = torch.stack([t.support_y for t in tasks])
    orders = torch.stack([o for _, o in drawn]).to(sx.device)  # [n, iters, batch]
    rows = torch.arange(len(tasks), device=sx.device)[:, None, None]
    # [iters, n, batch, ...]: task i's mini-batch at inner step s is xs[s, i].
    xs, ys = sx[rows, orders].transpose(0, 1), sy[rows, orders].transpose(0, 1)
    adapted = adapter.adapt(xs, ys)
    out = adapter.predict(adapted, sx, torch.stack([t.query_x for t in tasks]), uses_one_batch(problem, transductive))
    return [problem.score(out[i], t.query_y) for i, t in enumerate(tasks)]


def default_eval_batch_tasks(device: torch.device) -> int:
    """Tasks adapted at once when ``--eval-batch-tasks`` is not given.

    CUDA: 32 (enough rows to fill the GPU with the paper's small nets).  CPU: 1, the
    sequential evaluation: batching measured no faster on the CPU (the README's
    evaluation benchmark), as for training (docs/batched.md).
    """
    return 32 if torch.device(device).type == "cuda" else 1


def check_eval_cuda_graph(opt, batch_tasks: int) -> None:
    """A ``ValueError`` (one line, for the command line) when ``--eval-cuda-graph`` cannot apply."""
    from ..batched.adapter import capture_unavailable_reason

    if batch_tasks < 2:
        raise ValueError(f"--eval-cuda-graph records the batched adaptation: it needs --eval-batch-tasks of 2 or more, "
                         f"got {batch_tasks}")
    reason = capture_unavailable_reason(opt)
    if reason is not None:
        raise ValueError(f"--eval-cuda-graph is impossible here: {reason}")


class EvalBatching:
    """How evaluation tasks are adapted: ``batch_tasks`` at once under vmap, or one at a
    time where batching does not apply (then :attr:`notice` says why, in one line).
    ``cuda_graph``: the batched adaptation is recorded as a CUDA graph and replayed
    (checked by :func:`check_eval_cuda_graph`)."""

    def __init__(self, model, opt, problem, batch_tasks: int, cuda_graph: bool = False):
        if not isinstance(batch_tasks, int) or batch_tasks < 1:
            raise ValueError(f"--eval-batch-tasks must be >= 1, got {batch_tasks}")
        if cuda_graph:
            check_eval_cuda_graph(opt, batch_tasks)
        self.batch_tasks = batch_tasks
        self.cuda_graph = cuda_graph
        self.adapter = None
        self.notice = None
        if batch_tasks > 1:
            from ..batched import BatchedAdapter, NotBatchableError

            try:
                self.adapter = BatchedAdapter(model, opt, problem.loss, capture=cuda_graph)
            except NotBatchableError as exc:
                self.fall_back(exc)

    def fall_back(self, exc) -> None:
        self.adapter = None
        self.notice = f"note: evaluating one task at a time (--eval-batch-tasks {self.batch_tasks} does not apply: {exc})"

    def score(self, model, opt, problem, drawn: list, eval_batch: int, eval_iters: int, transductive: bool,
              restorer: Restorer) -> list[float]:
        """Scores of the drawn ``(task, order)`` pairs, batched where possible."""
        if self.adapter is not None and len(drawn) > 1:
            from ..batched import NotBatchableError

            try:
                return score_tasks_batched(self.adapter, problem, drawn, transductive)
            except NotBatchableError as exc:  # vmap cannot run the model: nothing was changed
                self.fall_back(exc)
        return [evaluate_task(model, opt, problem, task, eval_batch, eval_iters, transductive, None, restorer, order)
                for task, order in drawn]


def evaluate(model, opt, problem, split: str, num_samples: int, eval_batch: int, eval_iters: int,
             transductive: bool, generator: torch.Generator, progress: bool = False, batch_tasks: int = 1,
             notice: Callable[[str], None] | None = None, cuda_graph: bool = False,
             batching: EvalBatching | None = None) -> dict:
    """The protocol over ``num_samples`` tasks: ``{metric, "ci95", "tasks"}`` (metric: acc or mse).

    ``batch_tasks`` tasks adapt at once (:class:`EvalBatching`); the tasks and their
    mini-batches are the same whatever ``batch_tasks``.  ``notice`` receives the one-line
    reason when batching does not apply.  ``cuda_graph``: the batched adaptation is
    recorded once as a CUDA graph and replayed (CUDA, ``cpp`` or ``triton`` backend).
    ``batching``: an :class:`EvalBatching` of ``model`` and ``opt`` to reuse (its
    recorded graphs with it) across calls; ``batch_tasks`` and ``cuda_graph`` must then
    match it.
    """
    if num_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {num_samples}")
    restorer = Restorer(opt)
    if batching is None:
        batching = EvalBatching(model, opt, problem, batch_tasks, cuda_graph)
    elif (batching.batch_tasks, batching.cuda_graph) != (batch_tasks, cuda_graph):
        raise ValueError(f"batching adapts {batching.batch_tasks} tasks at once (cuda_graph={batching.cuda_graph}), "
                         f"the call asks for {batch_tasks} (cuda_graph={cuda_graph})")
    told = False
    scores: list[float] = []
    bar = _progress(num_samples, progress, f"eval {split}")
    try:
        while len(scores) < num_samples:
            n = min(batching.batch_tasks, num_samples - len(scores))
            drawn = [draw_task(problem, split, eval_batch, eval_iters, generator) for _ in range(n)]
            scores.extend(batching.score(model, opt, problem, drawn, eval_batch, eval_iters, transductive, restorer))
            if batching.notice and not told and notice is not None:
                notice(batching.notice)
                told = True
            if bar is not None:
                bar.update(n)
                bar.set_postfix({problem.metric: f"{math.fsum(scores) / len(scores):.4f}"}, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    mean, ci = mean_ci95(scores)
    return {problem.metric: mean, "ci95": ci, "tasks": num_samples,
            "batch_tasks": batching.batch_tasks if batching.adapter else 1,
            "cuda_graph": batching.adapter is not None and batching.adapter.capture}


def _progress(total, enabled, desc):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # Rate and estimated time to finish from the first update on; smoothing 0.1 steadies
    # the estimate over a run whose batches take similar times.
    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True, smoothing=0.1,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tasks [{elapsed}<{remaining} left, {rate_fmt}{postfix}]")
