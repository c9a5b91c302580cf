"""Many tasks adapted at once from a ``ReptileOptimizer``'s weights and inner state, under ``torch.func.vmap``.

A :class:`~reptile_fused.ReptileOptimizer` adapts one task at a time.  Here ``n``
tasks adapt together, as :class:`~reptile_fused.BatchedReptile` adapts a meta-batch:
the n task copies of the weights live in one ``[n, P]`` buffer per flat buffer of the
optimizer, the model runs for all of them under ``vmap`` (with the same folded batch
norm / pooling / convolution rules), and every inner step is ONE backend call over the
``n·P`` elements, the inner optimizer's state included.

Each task starts from what a sequential adaptation starts from: the optimizer's
current weights (the meta-weights) and its current inner state (after training, Adam's
moments and step count, as in the authors' code), each task with its own copy.  The
optimizer and the model are never written to, so nothing needs restoring.

Given the same mini-batches, the adapted weights agree with a sequential adaptation
with the optimizer (then restored): on float64 to rounding, on float32 up to the order
in which vmap's batched kernels sum (see docs/batched.md).

On a GPU the whole adaptation (every inner step's forward, backward and fused
optimizer step, all n tasks) can be recorded once as a CUDA graph and replayed for
each following batch of tasks (``capture=True``), as :class:`~reptile_fused.BatchedReptile`
replays a meta-iteration: the task rows, the inputs, the learning rate and Adam's step
count live in fixed device buffers that are refilled before each replay.

Example:
    Five inner steps on each task's whole support set, then the query predictions::

        from reptile_fused.batched import adapt_tasks

        # support_x [n, S, ...], support_y [n, S], query_x [n, Q, ...]
        steps = 5
        xs = support_x.expand(steps, *support_x.shape)
        ys = support_y.expand(steps, *support_y.shape)
        result = adapt_tasks(model, opt, xs, ys, query_x=query_x)
        result.weights["0.weight"]  # [n, *shape]: task i's adapted weight is row i
        result.predictions  # [n, Q, classes]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .. import inner
from .._validate import opmath_dtype
from .batchable import NotBatchableError, check_batchable, failing_layer
from .graph import CapturedIteration, graph_key
from .graph import capture_unavailable_reason as _graph_unavailable_reason
from .vmap_rules import CAN_FOLD, FoldTasksIntoChannels

if TYPE_CHECKING:
    from ..flat_state import FlatState
    from ..optimizer import ReptileOptimizer

__all__ = ["AdaptedTasks", "BatchedAdapter", "TaskRows", "adapt_tasks", "capture_unavailable_reason"]

# Adaptations of other input shapes (or first-step flags) beyond this many run eagerly:
# each graph keeps its own memory pool.  An evaluation needs at most two (its full
# batches and the last, smaller one).
MAX_GRAPHS = 4


def capture_unavailable_reason(opt: ReptileOptimizer) -> str | None:
    """Why ``opt``'s adaptation cannot be recorded as a CUDA graph.

    Args:
        opt: the optimizer a :class:`BatchedAdapter` would adapt from.

    Returns:
        ``None`` when it can be recorded, else the reason in one line.
    """
    return _graph_unavailable_reason({f.buffer.device.type for f in opt._flats}, opt.backends,
                                     "the learning rate and the step count")  # fmt: skip


class TaskRows:
    """One flat buffer of the optimizer and its n task rows: what :meth:`BatchedAdapter.adapt` returns, one per flat buffer.

    Attributes:
        names: the model's names of the buffer's parameters, in buffer order.
        tasks: the ``[n, P]`` task weights (row i: task i's flat parameters).
        leaves: per parameter, its ``[n, *shape]`` view of ``tasks`` (what the model runs with).
        state: the inner optimizer's ``[n, P]`` state buffers, by torch's names.
        lr_t, step_t: with device scalars (capture), the learning rate and Adam's step
            count as 0-dim device tensors the backend reads; else ``None``.
    """

    def __init__(self, flat: FlatState, names: list[str], opt: ReptileOptimizer, n: int, inner_optimizer: str,
                 device_scalars: bool = False):  # fmt: skip
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

    ``opt`` is only read: every call starts again from its weights and inner state.

    Args:
        model: the network whose parameters ``opt`` holds.  Normalisation layers must use
            batch statistics (``track_running_stats=False``).
        opt: the :class:`~reptile_fused.ReptileOptimizer` over ``model``'s trainable parameters.
        loss_fn: per-task loss ``loss_fn(model_output, y)``, called under ``vmap``
            (``F.cross_entropy`` and ``F.mse_loss`` are vmap-compatible).
        capture: record :meth:`adapt` as a CUDA graph at its first call for each input
            shape and replay it afterwards (CUDA, ``cpp`` or ``triton`` backend).  The
            graph reads the learning rate and Adam's step count from device tensors, as
            the captured :class:`~reptile_fused.BatchedReptile` does, so it agrees with the
            eager adaptation to rounding (Adam's bias corrections from a device step
            count), not bit for bit.

    Raises:
        NotBatchableError: where the batched adaptation would not reproduce the
            sequential one: running-statistics batch norm, parameters outside the
            optimizer, or parameters at different inner step counts.  A model vmap
            cannot run raises it at the first :meth:`adapt`.
        ValueError: ``capture=True`` where a graph cannot be recorded (the message says why).
    """

    def __init__(self, model: nn.Module, opt: ReptileOptimizer, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 capture: bool = False):  # fmt: skip
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
        if any(f.buffer.sharded for f in self._flats):
            raise NotBatchableError(
                "the optimizer steps FSDP2 (DTensor) parameters: batched adaptation vmaps the whole model over "
                "the tasks, which FSDP's sharded modules do not support; adapt with opt.task() instead"
            )
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
        self._graphs: dict[tuple, tuple[list[TaskRows], CapturedIteration, tuple]] = {}
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
                                    f"{type(exc).__name__}: {exc}") from exc  # fmt: skip

    def _new_rows(self, n: int) -> list[TaskRows]:
        return [TaskRows(f, names, self.opt, n, self.inner_optimizer, self._device_scalars)
                for f, names in zip(self._flats, self._flat_names)]  # fmt: skip

    def adapt(self, xs: Tensor, ys: Tensor) -> list[TaskRows]:
        """Adapt ``xs.shape[1]`` tasks, one inner step per leading index of ``xs``.

        Args:
            xs: ``[steps, n, batch, ...]`` inputs: ``xs[s, i]`` is task i's mini-batch at inner step s.
            ys: the matching ``[steps, n, batch, ...]`` targets.

        Returns:
            The task rows (the adapted weights, one row per task), one :class:`TaskRows`
            per flat buffer of the optimizer, for :meth:`predict` and :meth:`weights`.
            With ``capture`` they are overwritten by the next call.
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

    def _steps(self, rows: list[TaskRows], xs: Tensor, ys: Tensor) -> None:
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

    @staticmethod
    def weights(rows: list[TaskRows]) -> dict[str, Tensor]:
        """The adapted weights by parameter name.

        Args:
            rows: what :meth:`adapt` returned.

        Returns:
            ``{name: [n, *shape]}`` (detached views of the rows): row i is task i's
            weight, e.g. for ``torch.func.functional_call(model, {k: w[i] for k, w in
            weights.items()}, x)``.
        """
        return {name: leaf.detach() for r in rows for name, leaf in zip(r.names, r.leaves)}

    @torch.no_grad()
    def predict(self, rows: list[TaskRows], support_x: Tensor | None, query_x: Tensor,
                transductive: bool = True) -> Tensor:  # fmt: skip
        """Query outputs of the adapted tasks, the model in ``eval()`` mode.

        Batch norm normalises with the statistics of the batch, so how the queries are
        batched matters; both ways of the authors' evaluation protocol are here.

        Args:
            rows: what :meth:`adapt` returned.
            support_x: ``[n, S, ...]`` support inputs (used when not ``transductive``).
            query_x: ``[n, Q, ...]`` query inputs.
            transductive: ``True``: each task's queries in one batch.  ``False``: each
                query alone with its task's whole support set, only its own output kept.

        Returns:
            ``[n, Q, ...]`` outputs.
        """
        params = self.weights(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            if transductive:
                return self._run(self._forward, params, query_x)
            if support_x is None:
                raise ValueError("transductive=False needs support_x: each query is batched with its support set")
            outs = [self._run(self._forward, params, torch.cat([support_x, query_x[:, q : q + 1]], dim=1))[:, -1]
                    for q in range(query_x.shape[1])]  # fmt: skip
            return torch.stack(outs, dim=1)
        finally:
            self.model.train(was_training)


class AdaptedTasks(NamedTuple):
    """What :func:`adapt_tasks` returns."""

    weights: dict[str, Tensor]
    """``{name: [n, *shape]}``: row i of each is task i's adapted parameter."""
    predictions: Tensor | None
    """``[n, Q, ...]`` query outputs with each task's adapted weights (``None`` without ``query_x``)."""


def adapt_tasks(
    model: nn.Module,
    opt: ReptileOptimizer,
    xs: Tensor,
    ys: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    query_x: Tensor | None = None,
    support_x: Tensor | None = None,
    transductive: bool = True,
) -> AdaptedTasks:
    """Adapt n tasks at once from ``model``'s current weights and ``opt``'s inner state.

    The batched equivalent of, for each task i, ``with opt.task():`` and one
    ``opt.step()`` per mini-batch ``xs[s, i]`` (then restoring the weights and inner
    state): one vmapped forward/backward and one fused optimizer step per inner step,
    over all n tasks.  ``model`` and ``opt`` are not changed.  For repeated calls (an
    evaluation loop, CUDA-graph replay) build one :class:`BatchedAdapter` and reuse it.

    Args:
        model: the network whose parameters ``opt`` holds; normalisation layers must use
            batch statistics (``track_running_stats=False``).
        opt: the :class:`~reptile_fused.ReptileOptimizer` over ``model``'s trainable
            parameters; its inner optimizer and hyperparameters are the adaptation's.
        xs: ``[steps, n, batch, ...]`` inputs: ``xs[s, i]`` is task i's mini-batch at inner
            step s (the same batch each step: ``support_x.expand(steps, *support_x.shape)``).
        ys: the matching ``[steps, n, batch, ...]`` targets.
        loss_fn: per-task loss, called under ``vmap``.
        query_x: ``[n, Q, ...]`` query inputs to predict with the adapted weights.
        support_x: ``[n, S, ...]`` support inputs, needed with ``transductive=False``.
        transductive: how queries are batched (see :meth:`BatchedAdapter.predict`).

    Returns:
        The adapted weights by parameter name, and the query predictions when
        ``query_x`` is given.

    Raises:
        NotBatchableError: the model or optimizer cannot be adapted batched (see
            :class:`BatchedAdapter`).
    """
    adapter = BatchedAdapter(model, opt, loss_fn)
    rows = adapter.adapt(xs, ys)
    predictions = None if query_x is None else adapter.predict(rows, support_x, query_x, transductive)
    return AdaptedTasks(adapter.weights(rows), predictions)
