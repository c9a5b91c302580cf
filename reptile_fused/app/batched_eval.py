"""Evaluation tasks adapted many at once: the evaluation protocol under ``torch.func.vmap``.

:func:`~reptile_fused.app.evaluate.evaluate` adapts one task at a time.  Here ``n``
tasks adapt together, as :class:`~reptile_fused.BatchedReptile` adapts a meta-batch:
the n task copies of the weights live in one ``[n, P]`` buffer per flat buffer of the
optimizer, the model runs for all of them under ``vmap`` (with the same folded batch
norm / pooling / convolution rules), and every inner step is ONE backend call over the
``n·P`` elements, the inner optimizer's state included.

Each task starts from what the sequential protocol starts from: the optimizer's
current weights (the meta-weights) and its current inner state (after training, Adam's
moments and step count, as in the authors' code), each task with its own copy.  The
optimizer and the model are never written to, so nothing needs restoring.

Same tasks, same mini-batches (the caller draws them in the sequential order), so
the scores agree with the sequential ones: on float64 the accuracies are identical;
on float32 vmap's batched kernels sum in another order, which moves the adapted
weights by rounding (see docs/batched.md) and can flip a near-tied query prediction.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .. import inner
from ..batched.batchable import NotBatchableError, check_batchable, failing_layer
from ..batched.vmap_rules import CAN_FOLD, FoldTasksIntoChannels
from ..optimizer import ReptileOptimizer

__all__ = ["BatchedAdapter", "NotBatchableError", "default_eval_batch_tasks"]


def default_eval_batch_tasks(device: torch.device) -> int:
    """Tasks adapted at once when ``--eval-batch-tasks`` is not given.

    CUDA: 32 (enough rows to fill the GPU with the paper's small nets).  CPU: 1, the
    sequential evaluation: batching measured no faster on the CPU (the README's
    evaluation benchmark), as for training (docs/batched.md).
    """
    return 32 if torch.device(device).type == "cuda" else 1


class _Rows:
    """One flat buffer of the optimizer and its n task rows."""

    def __init__(self, flat, names: list[str], group: dict, n: int):
        b = flat.buffer
        if len(set(flat.steps)) > 1:
            raise NotBatchableError("the optimizer's parameters are at different inner step counts")
        self.buffer = b
        self.backend = flat.backend
        self.group = group
        self.names = names
        self.steps0 = flat.steps[0] if flat.steps else 0
        self.tasks = b.data.unsqueeze(0).repeat(n, 1)
        self.grad = torch.zeros_like(self.tasks)
        self.state = {key: buf.unsqueeze(0).repeat(n, 1) for key, buf in flat.state.items()}
        self.leaves = [b.row_view(self.tasks, i).detach().requires_grad_() for i in range(len(b.params))]
        self.grad_views = [b.row_view(self.grad, i) for i in range(len(b.params))]

    def state_buffer(self, key: str) -> Tensor:
        if key not in self.state:
            self.state[key] = torch.zeros_like(self.tasks)
        return self.state[key]


class BatchedAdapter:
    """Adapts n tasks at once from ``opt``'s current weights and inner state.

    ``opt`` is the :class:`~reptile_fused.ReptileOptimizer` over ``model``'s parameters;
    it is only read.  Raises :class:`NotBatchableError` (with the reason) where the
    batched protocol would not reproduce the sequential one: running-statistics batch
    norm, parameters outside the optimizer, or parameters at different inner step
    counts.  A model vmap cannot run fails at the first :meth:`adapt` with it too.
    """

    def __init__(self, model: nn.Module, opt: ReptileOptimizer, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        check_batchable(model)
        self.model = model
        self.opt = opt
        self.loss_fn = loss_fn
        self.inner_optimizer = opt.inner_optimizer
        names = {id(p): name for name, p in model.named_parameters()}
        self._flats = list(opt._flats)
        self._flat_names = []
        covered = set()
        for f in self._flats:
            missing = [p for p in f.buffer.params if id(p) not in names]
            if missing:
                raise NotBatchableError("the optimizer holds parameters that are not the model's")
            self._flat_names.append([names[id(p)] for p in f.buffer.params])
            covered.update(id(p) for p in f.buffer.params)
        if any(p.requires_grad and id(p) not in covered for p in model.parameters()):
            raise NotBatchableError("some trainable parameters of the model are not in the optimizer")
        self._losses = vmap(self._task_loss, in_dims=(0, 0, 0), randomness="different")
        self._forward = vmap(self._task_forward, in_dims=(0, 0), randomness="different")

    def _task_loss(self, params, x, y):
        return self.loss_fn(functional_call(self.model, params, (x,)), y)

    def _task_forward(self, params, x):
        return functional_call(self.model, params, (x,))

    def _run(self, fn, *args):
        try:
            if CAN_FOLD:
                with FoldTasksIntoChannels():
                    return fn(*args)
            return fn(*args)
        except Exception as exc:
            layer = failing_layer(exc, self.model)
            where = f"in layer {layer}" if layer else "in the model or loss function"
            raise NotBatchableError(f"torch.func.vmap cannot run the model: failed {where}: "
                                    f"{type(exc).__name__}: {exc}") from exc

    def adapt(self, xs: Tensor, ys: Tensor) -> list[_Rows]:
        """Adapt ``xs.shape[1]`` tasks: ``xs[s, i]`` / ``ys[s, i]`` is task i's batch at inner step s.

        Returns the rows (the adapted weights, one row per task) for :meth:`predict`.
        """
        n = xs.shape[1]
        rows = [_Rows(f, names, self.opt.param_groups[f.group_index], n) for f, names in zip(self._flats, self._flat_names)]
        params = {name: leaf for r in rows for name, leaf in zip(r.names, r.leaves)}
        leaves = [leaf for r in rows for leaf in r.leaves]
        views = [v for r in rows for v in r.grad_views]
        was_training = self.model.training
        self.model.train()
        try:
            for s in range(xs.shape[0]):
                with torch.enable_grad():
                    losses = self._run(self._losses, params, xs[s], ys[s])
                    grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
                with torch.no_grad():
                    used = [(v, g) for v, g in zip(views, grads) if g is not None]
                    if used:
                        torch._foreach_copy_([v for v, _ in used], [g for _, g in used])
                    for v, g in zip(views, grads):
                        if g is None:
                            v.zero_()
                    for r in rows:
                        h = r.group
                        count = r.steps0 + s
                        inner.step_(
                            r.backend, self.inner_optimizer, h, r.tasks.view(-1), r.grad.view(-1),
                            {key: r.state_buffer(key).view(-1) for key in inner.state_keys(self.inner_optimizer, h)},
                            lr=h["lr"], step=count + 1, first_step=count == 0,
                        )  # fmt: skip
        finally:
            self.model.train(was_training)
        return rows

    @torch.no_grad()
    def predict(self, rows: list[_Rows], support_x: Tensor, query_x: Tensor, transductive: bool) -> Tensor:
        """Query outputs ``[n, Q, ...]`` of the adapted tasks (``support_x`` ``[n, S, ...]``,
        ``query_x`` ``[n, Q, ...]``), with the sequential protocol's batching of the queries."""
        params = {name: leaf.detach() for r in rows for name, leaf in zip(r.names, r.leaves)}
        was_training = self.model.training
        self.model.eval()
        try:
            if transductive:
                return self._run(self._forward, params, query_x)
            outs = [self._run(self._forward, params, torch.cat([support_x, query_x[:, q : q + 1]], dim=1))[:, -1]
                    for q in range(query_x.shape[1])]
            return torch.stack(outs, dim=1)
        finally:
            self.model.train(was_training)
