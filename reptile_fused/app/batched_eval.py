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

On a GPU the whole adaptation (every inner step's forward, backward and fused
optimizer step, all n tasks) can be recorded once as a CUDA graph and replayed for
each following batch of tasks (``capture=True``, ``eval --eval-cuda-graph``), as
:class:`~reptile_fused.BatchedReptile` replays a meta-iteration: the task rows, the
inputs, the learning rate and Adam's step count live in fixed device buffers that
are refilled before each replay.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .. import inner
from ..batched.batchable import NotBatchableError, check_batchable, failing_layer
from ..batched.vmap_rules import CAN_FOLD, FoldTasksIntoChannels
from .._validate import opmath_dtype
from ..batched.graph import CapturedIteration, graph_key
from ..batched.graph import capture_unavailable_reason as _graph_unavailable_reason
from ..optimizer import ReptileOptimizer

__all__ = ["BatchedAdapter", "NotBatchableError", "capture_unavailable_reason", "default_eval_batch_tasks"]

# Adaptations of other input shapes (or first-step flags) beyond this many run eagerly:
# each graph keeps its own memory pool.  An evaluation needs at most two (its full
# batches and the last, smaller one).
MAX_GRAPHS = 4


def default_eval_batch_tasks(device: torch.device) -> int:
    """Tasks adapted at once when ``--eval-batch-tasks`` is not given.

    CUDA: 32 (enough rows to fill the GPU with the paper's small nets).  CPU: 1, the
    sequential evaluation: batching measured no faster on the CPU (the README's
    evaluation benchmark), as for training (docs/batched.md).
    """
    return 32 if torch.device(device).type == "cuda" else 1


def capture_unavailable_reason(opt: ReptileOptimizer) -> str | None:
    """Why ``opt``'s adaptation cannot be recorded as a CUDA graph (``None``: it can)."""
    return _graph_unavailable_reason({f.buffer.device.type for f in opt._flats}, opt.backends,
                                     "the learning rate and the step count")


class _Rows:
    """One flat buffer of the optimizer and its n task rows.

    ``device_scalars``: the learning rate and Adam's step count live in 0-dim device
    tensors the backend reads (what a captured graph needs), refilled by :meth:`load`.
    """

    def __init__(self, flat, names: list[str], opt: ReptileOptimizer, n: int, inner_optimizer: str,
                 device_scalars: bool = False):
        b = flat.buffer
        self.flat = flat
        self.opt = opt
        self.buffer = b
        self.backend = flat.backend
        self.names = names
        self.tasks = torch.empty((n, *b.data.shape), device=b.data.device, dtype=b.data.dtype)
        self.grad = torch.zeros_like(self.tasks)
        # Laid out for the hyperparameters of now (momentum 0 keeps no buffer, amsgrad one
        # more): rows outlive a change of them only through frozen(), which re-records.
        self.state = {key: torch.empty_like(self.tasks) for key in inner.state_keys(inner_optimizer, self.group)}
        self.leaves = [b.row_view(self.tasks, i).detach().requires_grad_() for i in range(len(b.params))]
        self.grad_views = [b.row_view(self.grad, i) for i in range(len(b.params))]
        kind = opmath_dtype(b.data.dtype)
        self.lr_t = torch.zeros((), device=b.data.device, dtype=kind) if device_scalars else None
        self.step_t = torch.zeros((), device=b.data.device, dtype=kind) if device_scalars else None
        self.load()

    @property
    def group(self) -> dict:
        """The optimizer's param group as it is now: ``load_state_dict`` replaces the
        dicts, so a reference kept from construction would go stale."""
        return self.opt.param_groups[self.flat.group_index]

    def load(self) -> None:
        """Every row from the optimizer's current weights and inner state."""
        flat = self.flat
        if len(set(flat.steps)) > 1:
            raise NotBatchableError("the optimizer's parameters are at different inner step counts")
        self.steps0 = flat.steps[0] if flat.steps else 0
        self.tasks.copy_(self.buffer.data.unsqueeze(0).expand_as(self.tasks))
        for key, rows in self.state.items():
            if key in flat.state:
                rows.copy_(flat.state[key].unsqueeze(0).expand_as(rows))
            else:  # no step taken yet: torch's state starts at zero
                rows.zero_()
        if self.lr_t is not None:
            self.lr_t.fill_(self.group["lr"])
            self.step_t.fill_(self.steps0)

    def frozen(self) -> tuple:
        """What a captured graph holds fixed: the first-step rule and every hyperparameter
        but the learning rate (read from ``lr_t``)."""
        hyper = tuple((k, v) for k, v in sorted(self.group.items()) if k not in ("params", "lr"))
        return (self.steps0 == 0, repr(hyper))


class BatchedAdapter:
    """Adapts n tasks at once from ``opt``'s current weights and inner state.

    ``opt`` is the :class:`~reptile_fused.ReptileOptimizer` over ``model``'s parameters;
    it is only read.  Raises :class:`NotBatchableError` (with the reason) where the
    batched protocol would not reproduce the sequential one: running-statistics batch
    norm, parameters outside the optimizer, or parameters at different inner step
    counts.  A model vmap cannot run fails at the first :meth:`adapt` with it too.

    ``capture=True`` (CUDA, ``cpp`` or ``triton`` backend; otherwise a ``ValueError``
    saying why) records :meth:`adapt` as a CUDA graph at its first call for each input
    shape and replays it afterwards.  The graph reads the learning rate and Adam's step
    count from device tensors, as the captured :class:`~reptile_fused.BatchedReptile`
    does, so it agrees with the eager adaptation to rounding (Adam's bias corrections
    from a device step count), not bit for bit.
    """

    def __init__(self, model: nn.Module, opt: ReptileOptimizer, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 capture: bool = False):
        if not isinstance(capture, bool):
            raise ValueError(f"capture must be True or False, got {capture!r}")
        if capture:
            reason = capture_unavailable_reason(opt)
            if reason is not None:
                raise ValueError(f"capture=True is impossible here: {reason}")
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
        self.capture = capture
        # Rows whose lr / step count are device tensors: set by capture (a test sets it
        # alone to run that bookkeeping eagerly where no GPU is).
        self._device_scalars = capture
        self._graphs: dict[tuple, tuple[list[_Rows], CapturedIteration, tuple]] = {}
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

    def _new_rows(self, n: int) -> list[_Rows]:
        return [_Rows(f, names, self.opt, n, self.inner_optimizer, self._device_scalars)
                for f, names in zip(self._flats, self._flat_names)]

    def adapt(self, xs: Tensor, ys: Tensor) -> list[_Rows]:
        """Adapt ``xs.shape[1]`` tasks: ``xs[s, i]`` / ``ys[s, i]`` is task i's batch at inner step s.

        Returns the rows (the adapted weights, one row per task) for :meth:`predict`;
        with ``capture``, they are overwritten by the next call.
        """
        if not self.capture:
            rows = self._new_rows(xs.shape[1])
            self._steps(rows, xs, ys)
            return rows
        key = graph_key(xs, ys, None)
        entry = self._graphs.get(key)
        if entry is None and len(self._graphs) >= MAX_GRAPHS:
            rows = self._new_rows(xs.shape[1])
            self._steps(rows, xs, ys)
            return rows
        if entry is not None:
            rows, graph, frozen = entry
            for r in rows:
                r.load()
            if tuple(r.frozen() for r in rows) == frozen:
                graph.replay(xs, ys)
                return rows
        # First sight of this shape, or what the graph holds fixed changed: record anew,
        # into new rows, whose state buffers follow the hyperparameters of now.  The
        # recording's warm-up adapts these tasks, so the rows hold the result.
        rows = self._new_rows(xs.shape[1])
        graph = CapturedIteration(lambda x, y, _: self._steps(rows, x, y), xs, ys, None,
                                  device=rows[0].tasks.device)  # fmt: skip
        self._graphs[key] = (rows, graph, tuple(r.frozen() for r in rows))
        return rows

    def _steps(self, rows: list[_Rows], xs: Tensor, ys: Tensor) -> None:
        """Every inner step of the adaptation, from the rows as loaded."""
        params = {name: leaf for r in rows for name, leaf in zip(r.names, r.leaves)}
        leaves = [leaf for r in rows for leaf in r.leaves]
        views = [v for r in rows for v in r.grad_views]
        adam = self.inner_optimizer == "adam"
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
                        step = count + 1
                        if r.step_t is not None and adam:
                            r.step_t.add_(1)  # on the device: a replay counts from the loaded value
                            step = r.step_t
                        inner.step_(
                            r.backend, self.inner_optimizer, h, r.tasks.view(-1), r.grad.view(-1),
                            {key: buf.view(-1) for key, buf in r.state.items()},
                            lr=r.lr_t if r.lr_t is not None else h["lr"], step=step, first_step=count == 0,
                        )  # fmt: skip
        finally:
            self.model.train(was_training)

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
