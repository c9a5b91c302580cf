"""The functional API of the original sketch, ``reptile_train`` and ``reptile_adapt``, on ``ReptileOptimizer``."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batched import BatchedReptile, NotBatchableError, check_batchable
from .batched.batchable import running_stat_layers
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
def _query_metrics(model: nn.Module, x: Tensor, y: Tensor, loss_fn, forward=None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    out = (forward or model)(x)
    metrics = {"query_loss": float(loss_fn(out, y))}
    if not y.is_floating_point() and out.dim() == 2:
        metrics["query_acc"] = float((out.argmax(1) == y).float().mean())
    model.train(was_training)
    return metrics


# Where batched=None picks batched mode.  On the CPU it measured no faster than
# sequential on the Omniglot-style net and slower on the Mini-ImageNet-style one
# (n task activations at once leave the caches; benchmarks/results/benchmarks.csv, meta_iteration rows).
AUTO_BATCHED_DEVICES = ("cuda",)


def _batched_reason(meta_batch_size: int, inner_optimizer: str, optimizer_kwargs: dict) -> str | None:
    """Why batched mode would not reproduce the sequential run, or None if it would."""
    if meta_batch_size < 2:
        return "meta_batch_size is 1 (nothing to batch)"
    stateless = inner_optimizer == "sgd" and optimizer_kwargs.get("momentum", 0.0) == 0
    if not stateless and optimizer_kwargs.get("reset_inner_state", "never") != "task":
        return (
            f"the {inner_optimizer!r} inner optimizer carries its state from task to task "
            f"(reset_inner_state={optimizer_kwargs.get('reset_inner_state', 'never')!r}), which tasks "
            "adapting side by side cannot; pass reset_inner_state='task' for batched mode"
        )
    return None


def _stack(tasks: list[Task], device: torch.device) -> list[Tensor]:
    try:
        return [torch.stack([t[j] for t in tasks]).to(device) for j in range(4)]
    except RuntimeError as exc:
        raise ValueError(
            f"batched mode stacks the tasks of a meta-batch, and these differ in shape ({exc}); "
            "use reptile_train(batched=False) for tasks of different sizes"
        ) from exc


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
    batched: bool | None = None,
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
    :class:`ReptileOptimizer` (``momentum``, ``betas``, ``memory_format``,
    ``algorithm="fomaml"`` for first-order MAML, ...).  Returns ``model``.

    ``batched`` chooses how the tasks of a meta-batch adapt: ``False``: one after
    another (:class:`ReptileOptimizer`); ``True``: all at once
    (:class:`~reptile_fused.batched.BatchedReptile`), or an error saying why not;
    ``None`` (default): batched on CUDA when it gives the sequential result —
    meta_batch_size > 1, an inner optimizer without state carried between tasks
    (plain SGD, or ``reset_inner_state="task"``), a model vmap can batch, tasks of
    equal shapes — else sequential (with a warning when only the model or the task
    shapes stand in the way); on the CPU sequential, which measured as fast or faster.
    Both modes draw the tasks from ``task_sampler`` in the same order.
    """
    if meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be >= 1, got {meta_batch_size}")
    if inner_steps < 0 or num_iterations < 0:
        raise ValueError("inner_steps and num_iterations must be >= 0")
    if batched not in (None, True, False):
        raise ValueError(f"batched must be None, True or False, got {batched!r}")
    reason = _batched_reason(meta_batch_size, inner_optimizer, optimizer_kwargs)
    if batched is True and reason is not None:
        raise ValueError(f"batched=True: {reason}")
    device = torch.device(device or default_device())
    model = model.to(device)
    sampler = iter(task_sampler)
    meta_batches = _meta_batches(sampler, meta_batch_size, num_iterations)
    log = log or (lambda it, m: print(f"Iteration {it}: " + ", ".join(f"{k} = {v:.4f}" for k, v in m.items())))
    common = (model, meta_lr, inner_lr, inner_steps, device, meta_batch_size, loss_fn, inner_optimizer, backend)
    if batched is None and device.type not in AUTO_BATCHED_DEVICES:
        batched = False
    if batched is not False and reason is None and num_iterations > 0:
        first = next(meta_batches)
        if batched is None:
            why_not = _batched_blocker(model, first)
            if why_not is None:
                failure = _train_batched(*common, first, meta_batches, log_interval, log, optimizer_kwargs, probe=True)
                if failure is None:
                    return model
                why_not = str(failure)
            warnings.warn(f"reptile_train runs sequentially: {why_not}; pass batched=False to silence this", stacklevel=2)
            _train_sequential(*common, itertools.chain([first], meta_batches), log_interval, log, optimizer_kwargs)
            return model
        _train_batched(*common, first, meta_batches, log_interval, log, optimizer_kwargs, probe=False)
        return model
    _train_sequential(*common, meta_batches, log_interval, log, optimizer_kwargs)
    return model


def _meta_batches(sampler: Iterator[Task], n: int, iterations: int) -> Iterator[list[Task]]:
    for iteration in range(iterations):
        tasks = []
        for _ in range(n):
            try:
                tasks.append(next(sampler))
            except StopIteration:
                # A generator may not let StopIteration out (PEP 479); say what ran out instead.
                raise ValueError(
                    f"task_sampler ran out in iteration {iteration}: reptile_train needs "
                    f"num_iterations x meta_batch_size = {iterations * n} tasks"
                ) from None
        yield tasks


def _batched_blocker(model: nn.Module, meta_batch: list[Task]) -> str | None:
    """Why batched mode cannot run this model on these tasks (checked before any update)."""
    try:
        check_batchable(model)
    except NotBatchableError as exc:
        return str(exc)
    shapes = {tuple(tuple(t.shape) for t in task) for task in meta_batch}
    if len(shapes) > 1:
        return "the tasks of a meta-batch differ in shape, so they cannot be stacked"
    return None


def warn_running_stats(model: nn.Module) -> None:
    """Say that sequential Reptile restores parameters only, not normalisation running statistics."""
    layers = running_stat_layers(model)
    if layers:
        name, m = layers[0]
        warnings.warn(
            f"layer {name!r} ({type(m).__name__}) tracks running statistics: ReptileOptimizer.task() restores "
            "the parameters only, so running_mean/running_var/num_batches_tracked carry the last task's values "
            "(as in the authors' code, which restores trainable variables only). Build normalisation layers "
            "with track_running_stats=False (batch statistics, as in the paper) to keep tasks independent.",
            UserWarning,
            stacklevel=3,
        )


def _train_sequential(
    model, meta_lr, inner_lr, inner_steps, device, meta_batch_size, loss_fn, inner_optimizer, backend,
    meta_batches, log_interval, log, optimizer_kwargs,
) -> None:
    warn_running_stats(model)
    opt = ReptileOptimizer(
        model.parameters(),
        inner_optimizer=inner_optimizer,
        lr=inner_lr,
        meta_lr=meta_lr,
        backend=backend,
        **optimizer_kwargs,
    )
    for iteration, tasks in enumerate(meta_batches):
        logging = log_interval > 0 and iteration % log_interval == 0
        for t, task in enumerate(tasks):
            support_x, support_y, query_x, query_y = (v.to(device) for v in task)
            with opt.task():
                _inner_loop(model, opt, support_x, support_y, inner_steps, loss_fn)
                if logging and t == 0:
                    metrics = _query_metrics(model, query_x, query_y, loss_fn)
        opt.meta_step()
        if logging:
            log(iteration, metrics)


def _train_batched(
    model, meta_lr, inner_lr, inner_steps, device, meta_batch_size, loss_fn, inner_optimizer, backend,
    first, meta_batches, log_interval, log, optimizer_kwargs, probe,
) -> NotBatchableError | None:
    """Batched meta-training.  With ``probe``, a model vmap cannot run makes the very
    first inner step fail before anything is updated; that error is returned (for the
    caller to train sequentially instead) rather than raised."""
    kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "reset_inner_state"}
    br = BatchedReptile(
        model, meta_batch_size, inner_optimizer, lr=inner_lr, meta_lr=meta_lr, loss_fn=loss_fn, backend=backend, **kwargs
    )
    for iteration, tasks in enumerate(itertools.chain([first], meta_batches)):
        logging = log_interval > 0 and iteration % log_interval == 0
        support_x, support_y, query_x, query_y = _stack(tasks, device)
        for step in range(inner_steps):
            if probe and iteration == 0 and step == 0:
                try:
                    br.inner_step(support_x, support_y)
                except NotBatchableError as exc:
                    return exc
            else:
                br.inner_step(support_x, support_y)
        if logging:
            params = br.task_parameters(0)
            forward = lambda x: torch.func.functional_call(model, params, (x,))  # noqa: E731
            metrics = _query_metrics(model, query_x[0], query_y[0], loss_fn, forward)
        br.meta_step()
        if logging:
            log(iteration, metrics)
    return None


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
