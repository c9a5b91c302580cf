"""``BatchedReptile``: the n tasks of a meta-batch adapt together, one fused kernel per step.

Sequential Reptile adapts the tasks of a meta-batch one after another; on a GPU a small
few-shot model then spends its time launching tiny kernels from Python.  Here the n task
copies of the parameters live in one ``[n, P]`` buffer (per device/dtype), the model is
evaluated for all tasks at once with ``torch.func.functional_call`` under
``torch.func.vmap``, every inner optimizer step is ONE backend call over the ``n·P``
elements, and the meta update is ``batched_meta_update_`` (mean over the rows,
interpolation, and the new θ written back into every row, in one pass).  With
``capture=True`` a whole meta-iteration is recorded once as a CUDA graph and replayed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .. import inner
from .._validate import opmath_dtype
from ..backends import get_backend
from ..flat import FlatBuffer, check_memory_format
from .batchable import NotBatchableError, check_batchable, failing_layer
from .graph import CapturedIteration, capture_unavailable_reason, describe_key, graph_key
from .vmap_rules import CAN_FOLD, FoldTasksIntoChannels

__all__ = ["BatchedReptile"]

# "task": every task of every meta-iteration starts with fresh inner state (what
# sequential ReptileOptimizer(reset_inner_state="task") does).  "never": task slot i
# carries its own state from one meta-iteration to the next.
BATCHED_STATE_RESETS = ("task", "never")
CAPTURE_MODES = (False, True, "auto")


class _Group:
    """θ of one device/dtype (the model's own parameters, packed) and its n task rows."""

    def __init__(self, params: list[tuple[str, Tensor]], n: int, backend: str, memory_format=None):
        self.names = [name for name, _ in params]
        self.theta = FlatBuffer([p for _, p in params], memory_format)
        self.device, self.dtype = self.theta.device, self.theta.dtype
        self.backend = get_backend(backend, self.device)
        self.backend_name = self.backend.__name__.rsplit(".", 1)[-1]
        P = self.theta.numel
        self.tasks = self.theta.data.unsqueeze(0).repeat(n, 1)
        # Padding stays zero here forever: only the parameter views are ever written.
        self.grad = torch.zeros(n, P, device=self.device, dtype=self.dtype)
        self.state: dict[str, Tensor] = {}
        # First-order MAML: each row's last inner update (opmath dtype).
        self.updates: Tensor | None = None
        self.leaves: list[Tensor] = []
        self.grad_views: list[Tensor] = []
        for i in range(len(self.theta.shapes)):
            # Leaves that share storage with the task rows: autograd differentiates with
            # respect to them while the fused step updates the rows in place.
            leaf = self.theta.row_view(self.tasks, i).detach().requires_grad_()
            self.leaves.append(leaf)
            self.grad_views.append(self.theta.row_view(self.grad, i))
        self.theta_version = self.version()
        # Device scalars for capture mode (created on demand).
        self.lr_t: Tensor | None = None
        self.meta_lr_t: Tensor | None = None
        self.step_t: Tensor | None = None

    def version(self) -> tuple[int, ...]:
        # A parameter's ``.data`` was swapped for a view of the buffer, which leaves it
        # its own version counter: writes through the parameter (load_state_dict) bump
        # that one, writes to the buffer bump the buffer's.
        return (self.theta.data._version, *(p._version for p in self.theta.params))

    def update_buffer(self) -> Tensor:
        if self.updates is None:
            self.updates = torch.zeros(self.tasks.shape, device=self.device, dtype=opmath_dtype(self.dtype))
        return self.updates

    def state_buffer(self, key: str) -> Tensor:
        if key not in self.state:
            self.state[key] = torch.zeros_like(self.tasks)
        return self.state[key]

    def rows_from_theta(self) -> None:
        self.tasks.copy_(self.theta.data.unsqueeze(0).expand_as(self.tasks))
        self.theta_version = self.version()


class BatchedReptile:
    r"""Reptile with the whole meta-batch adapting at once.

    ``model``'s parameters are θ (packed into a flat buffer; ``model`` keeps working and
    always holds the meta-weights).  Each meta-iteration: ``inner_step(xs, ys)`` k times,
    then ``meta_step()``; or ``meta_iteration(xs, ys, ...)`` for both (the call that
    ``capture=True`` records as one CUDA graph).  ``algorithm="fomaml"`` makes the meta
    step first-order MAML's, θ ← θ + meta_lr · mean(θ̃ᵢ − θᵢ,ₖ₋₁), exactly as
    :class:`~reptile_fused.ReptileOptimizer` does.

    ``xs`` / ``ys`` hold one batch per task, stacked: ``xs[i]`` is what the model sees
    for task i.  Task i's loss is ``loss_fn(model(xs[i]), ys[i])`` with task i's weights.

    Args:
        model: the network.  Normalisation layers must use batch statistics
            (``track_running_stats=False``); see :func:`check_batchable`.
        n_tasks: the meta-batch size n (rows of the task buffer).
        inner_optimizer: ``"sgd"`` or ``"adam"``; hyperparameters as in
            :class:`~reptile_fused.ReptileOptimizer` (``lr``, ``momentum``, ``betas``, ...).
        meta_lr: meta step size ε.
        algorithm: ``"reptile"`` (default) or ``"fomaml"`` (each task contributes its
            last inner step's update; every inner step writes it in the pass that takes
            the step, into one more ``[n, P]`` buffer).
        loss_fn: per-task loss, called under ``vmap``: it must be vmap-compatible
            (``F.cross_entropy``, ``F.mse_loss`` are).
        reset_inner_state: ``"task"`` (default): every task of every meta-iteration
            starts with fresh inner state, exactly sequential
            ``ReptileOptimizer(reset_inner_state="task")``.  ``"never"``: task slot i
            keeps its own state (momentum, Adam moments, the Adam step count, which all
            slots share) across meta-iterations.  The sequential default, state carried
            from one task to the next *within* a meta-batch, has no batched equivalent
            for n > 1 (for n = 1, ``"never"`` is exactly it).
        randomness: passed to ``torch.func.vmap`` (``"different"``: each task draws its
            own dropout masks; ``"same"``; ``"error"``).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``, resolved per
            device by :func:`~reptile_fused.get_backend`.
        capture: ``False`` (eager), ``True`` (record ``meta_iteration`` as a CUDA graph;
            needs CUDA tensors and the ``cpp`` or ``triton`` backend, whose kernels read
            ``lr``, ``meta_lr`` and the Adam step from device memory; the ``reference``
            backend reads them on the host, which a graph cannot hold) or ``"auto"``
            (capture where possible, else eager with a warning saying why).
        memory_format: element order of the parameters in θ and the task rows, as for
            :class:`~reptile_fused.ReptileOptimizer`: ``None`` keeps each parameter's
            layout, ``torch.channels_last`` lays 4-D weights out channels-last.

    Memory: θ, and per task row one copy of the parameters, one gradient, and the inner
    state (SGD with momentum: 1 buffer, Adam: 2, with amsgrad 3), plus the last update
    with ``"fomaml"``: ``O(n·P)``, against
    ``O(P)`` for the sequential ``ReptileOptimizer``; plus the activations of all n
    tasks at once.
    """

    def __init__(
        self,
        model: nn.Module,
        n_tasks: int,
        inner_optimizer: str = "sgd",
        lr: float = 1e-3,
        meta_lr: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        algorithm: str = "reptile",
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        reset_inner_state: str = "task",
        randomness: str = "different",
        backend: str = "auto",
        capture: bool | str = False,
        memory_format=None,
    ):
        if not isinstance(n_tasks, int) or isinstance(n_tasks, bool) or n_tasks < 1:
            raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
        inner.check_inner_optimizer(inner_optimizer)
        inner.check_algorithm(algorithm)
        if reset_inner_state not in BATCHED_STATE_RESETS:
            hint = (
                " (in batched mode the tasks of a meta-batch run side by side, so 'meta_step' and 'task' "
                "would be the same thing: use 'task')"
                if reset_inner_state == "meta_step"
                else ""
            )
            raise ValueError(f"reset_inner_state must be one of {BATCHED_STATE_RESETS}, got {reset_inner_state!r}{hint}")
        if capture not in CAPTURE_MODES or (capture is not True and capture is not False and capture != "auto"):
            raise ValueError(f"capture must be False, True or 'auto', got {capture!r}")
        check_memory_format(memory_format)
        if randomness not in ("error", "different", "same"):
            raise ValueError(f"randomness must be 'error', 'different' or 'same', got {randomness!r}")
        hyper = dict(
            lr=lr, meta_lr=meta_lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
            weight_decay=weight_decay, betas=tuple(betas), eps=eps, amsgrad=amsgrad, maximize=maximize,
        )
        inner.check_hyperparameters(hyper)
        check_batchable(model)

        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor]]] = {}
        for name, p in trainable:
            by_key.setdefault((p.device, p.dtype), []).append((name, p))
        # Resolve every backend before packing anything, so a bad backend changes nothing.
        for device, _ in by_key:
            get_backend(backend, device)

        self.model = model
        self.n_tasks = n_tasks
        self.inner_optimizer = inner_optimizer
        self.algorithm = algorithm
        self.reset_inner_state = reset_inner_state
        self.loss_fn = loss_fn
        self.hyper = hyper
        self._groups = [_Group(params, n_tasks, backend, memory_format) for params in by_key.values()]
        if algorithm == "fomaml":
            # Allocated now, not inside the first (possibly captured) iteration.
            for g in self._groups:
                g.update_buffer()
        self._params = {
            name: leaf for g in self._groups for name, leaf in zip(g.names, g.leaves)
        }
        self._task_losses = vmap(self._task_loss, in_dims=(0, 0, 0), randomness=randomness)
        self._steps_pending = 0  # inner steps since the last meta step
        self._fresh = True  # the inner state holds nothing yet (SGD's first-step rule)
        self._adam_step = 0  # shared by all rows: every row steps together
        # The first_step flags the inner steps have launched with: each is its own kernel
        # variant for Triton, which must be compiled before a capture records it.
        self._first_steps_launched: set[bool] = set()
        self._capture_requested = capture
        self.capture = self._resolve_capture(capture)
        self._graph: CapturedIteration | None = None
        self._warned_shapes = False
        if self.capture:
            self._use_device_scalars()

    def _use_device_scalars(self) -> None:
        """Keep lr, meta_lr and Adam's step in 0-dim tensors on the buffers' device, read
        by the kernels: what a captured graph needs to see new values without re-capture."""
        for g in self._groups:
            kind = opmath_dtype(g.dtype)
            g.lr_t = torch.tensor(self.hyper["lr"], device=g.device, dtype=kind)
            g.meta_lr_t = torch.tensor(self.hyper["meta_lr"], device=g.device, dtype=kind)
            g.step_t = torch.tensor(float(self._adam_step), device=g.device, dtype=kind)

    # ------------------------------------------------------------------ configuration

    def _resolve_capture(self, capture) -> bool:
        if capture is False:
            return False
        reason = capture_unavailable_reason(
            {g.device.type for g in self._groups}, {g.backend_name for g in self._groups}, "lr/meta_lr/step"
        )
        if reason is None:
            return True
        if capture is True:
            raise ValueError(f"capture=True is impossible here: {reason}. Use capture=False (eager batched mode).")
        warnings.warn(f"BatchedReptile(capture='auto') runs eagerly: {reason}.", stacklevel=3)
        return False

    @property
    def lr(self) -> float:
        """The inner learning rate; set it to anneal (a captured graph sees the new value)."""
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self._set_scalar("lr", value)

    @property
    def meta_lr(self) -> float:
        """The meta step size ε; set it to anneal (a captured graph sees the new value)."""
        return self.hyper["meta_lr"]

    @meta_lr.setter
    def meta_lr(self, value: float) -> None:
        self._set_scalar("meta_lr", value)

    def _set_scalar(self, key: str, value) -> None:
        value = float(value.item() if isinstance(value, Tensor) else value)
        inner.check_hyperparameters({**self.hyper, key: value})
        self.hyper[key] = value
        for g in self._groups:
            t = g.lr_t if key == "lr" else g.meta_lr_t
            if t is not None:
                t.fill_(value)  # an ordinary device write: no re-capture, no sync

    @property
    def backends(self) -> list[str]:
        """The backend of each device/dtype group (``"auto"`` resolved)."""
        return [g.backend_name for g in self._groups]

    @property
    def task_buffers(self) -> list[Tensor]:
        """The ``[n, P]`` task buffers, one per device/dtype group."""
        return [g.tasks for g in self._groups]

    def task_parameters(self, task: int) -> dict[str, Tensor]:
        """Task ``task``'s current (adapted) weights by parameter name, for
        ``torch.func.functional_call(model, ...)``.  Views: valid until the next step."""
        if not 0 <= task < self.n_tasks:
            raise IndexError(f"task {task} out of range for n_tasks={self.n_tasks}")
        return {name: leaf[task].detach() for name, leaf in self._params.items()}

    # ------------------------------------------------------------------ inner loop

    def _task_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.model, params, (x,)), y)

    def _check(self, xs: Tensor, ys: Tensor) -> None:
        for name, t in (("xs", xs), ("ys", ys)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor with one row per task, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[0] != self.n_tasks:
                raise ValueError(
                    f"{name} must have the task dimension first: shape ({self.n_tasks}, ...), got {tuple(t.shape)}"
                )
        for g in self._groups:
            g.theta.check_layout()

    def _sync_rows(self) -> None:
        # θ changed outside meta_step() (load_state_dict, manual edits): start the rows from it.
        for g in self._groups:
            if g.version() != g.theta_version:
                g.rows_from_theta()

    def _gradients(self, xs: Tensor, ys: Tensor) -> Tensor:
        with torch.enable_grad():
            try:
                if CAN_FOLD:
                    with FoldTasksIntoChannels():
                        losses = self._task_losses(self._params, xs, ys)
                else:
                    losses = self._task_losses(self._params, xs, ys)
            except Exception as exc:
                layer = failing_layer(exc, self.model)
                where = f"in layer {layer}" if layer else "in the model or loss_fn"
                raise NotBatchableError(
                    f"batched mode could not run the model under torch.func.vmap: failed {where}: "
                    f"{type(exc).__name__}: {exc}. Use the sequential mode (ReptileOptimizer / "
                    "reptile_train(batched=False)) for this model, or make the layer vmap-compatible."
                ) from exc
            if losses.shape != (self.n_tasks,):
                raise ValueError(f"loss_fn must return one scalar per task, got per-task shape {tuple(losses.shape[1:])}")
            leaves = [leaf for g in self._groups for leaf in g.leaves]
            # Task losses are independent, so the gradient of their sum w.r.t. row i is
            # task i's own gradient.
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        views = [v for g in self._groups for v in g.grad_views]
        used = [(v, gr) for v, gr in zip(views, grads) if gr is not None]
        if used:
            torch._foreach_copy_([v for v, _ in used], [gr for _, gr in used])
        for v, gr in zip(views, grads):
            if gr is None:
                v.zero_()  # a parameter the loss does not reach: zero gradient, as torch's zeroed grads
        return losses.detach()

    @torch.no_grad()
    def inner_step(self, xs: Tensor, ys: Tensor) -> Tensor:
        """One inner optimizer step for all n tasks: ``xs[i]``, ``ys[i]`` are task i's batch.

        Returns the n task losses before the step (a device tensor; reading it syncs).
        """
        self._check(xs, ys)
        if self._steps_pending == 0:
            self._sync_rows()
        losses = self._gradients(xs, ys)
        h = self.hyper
        adam = self.inner_optimizer == "adam"
        fomaml = self.algorithm == "fomaml"
        for g in self._groups:
            step = self._adam_step + 1
            if adam and g.step_t is not None:
                g.step_t.add_(1)
                step = g.step_t
            inner.step_(
                g.backend, self.inner_optimizer, h, g.tasks.view(-1), g.grad.view(-1),
                {key: g.state_buffer(key).view(-1) for key in inner.state_keys(self.inner_optimizer, h)},
                lr=g.lr_t if g.lr_t is not None else h["lr"], step=step, first_step=self._fresh,
                update=g.update_buffer().view(-1) if fomaml else None,
            )  # fmt: skip
        self._first_steps_launched.add(self._fresh)
        self._adam_step += 1
        self._fresh = False
        self._steps_pending += 1
        return losses

    # ------------------------------------------------------------------ outer loop

    @torch.no_grad()
    def meta_step(self) -> None:
        """θ ← θ + meta_lr · mean(θ̃ᵢ − θ) (``"fomaml"``: mean(θ̃ᵢ − θᵢ,ₖ₋₁)); every task
        row restarts from the new θ."""
        for g in self._groups:
            g.theta.check_layout()
        fomaml = self.algorithm == "fomaml"
        if self._steps_pending == 0:
            self._sync_rows()
            if fomaml:  # no step taken: no last update
                for g in self._groups:
                    g.update_buffer().zero_()
        for g in self._groups:
            meta_lr = g.meta_lr_t if g.meta_lr_t is not None else self.hyper["meta_lr"]
            updates = g.update_buffer() if fomaml else None
            g.backend.batched_meta_update_(g.theta.data, g.tasks, meta_lr, write_back=True, updates=updates)
            g.theta_version = g.version()
        if self.reset_inner_state == "task":
            self._reset_inner_state()
        self._steps_pending = 0

    def _reset_inner_state(self) -> None:
        for g in self._groups:
            for key, buf in g.state.items():
                # SGD's first step overwrites the momentum buffer, so it needs no clearing.
                if key != "momentum_buffer":
                    buf.zero_()
            if g.step_t is not None:
                g.step_t.zero_()
        self._adam_step = 0
        self._fresh = True

    def meta_iteration(self, xs: Tensor, ys: Tensor, inner_steps: int | None = None) -> None:
        """One meta-iteration: the inner steps for all n tasks, then ``meta_step()``.

        ``xs`` is ``[k, n, ...]`` (one batch per inner step and task, k = ``xs.shape[0]``),
        or ``[n, ...]`` with ``inner_steps=k`` (the same batch for every step).
        With ``capture`` this is the call recorded as a CUDA graph: the first call runs
        eagerly (on a side stream, warming everything up) and records the graph, later
        calls copy ``xs``/``ys`` into the graph's static buffers and replay it.  Shapes,
        dtypes and ``inner_steps`` must then stay the same.
        """
        if self._steps_pending:
            raise RuntimeError(
                f"meta_iteration() with {self._steps_pending} inner step(s) pending: call meta_step() first"
            )
        if inner_steps is None:
            if not isinstance(xs, Tensor) or not isinstance(ys, Tensor) or xs.dim() < 2 or ys.dim() < 2:
                raise ValueError("without inner_steps, xs and ys must be [k, n, ...]: one batch per inner step")
            if xs.shape[0] != ys.shape[0]:
                raise ValueError(f"xs has {xs.shape[0]} inner steps, ys has {ys.shape[0]}")
        elif not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        if not self.capture:
            self._run_iteration(xs, ys, inner_steps)
            return
        key = graph_key(xs, ys, inner_steps)
        if self._graph is not None and key != self._graph.key:
            message = (
                f"the graph was captured for inputs {describe_key(self._graph.key)}, this call has "
                f"{describe_key(key)}; a CUDA graph replays fixed shapes"
            )
            if self._capture_requested is True:
                raise ValueError(f"capture=True: {message}. Keep shapes fixed, or use capture=False/'auto'.")
            if not self._warned_shapes:
                warnings.warn(f"BatchedReptile(capture='auto'): {message}; running eagerly.", stacklevel=2)
                self._warned_shapes = True
            self._run_iteration(xs, ys, inner_steps)
            return
        self._sync_rows()
        if self._graph is None:
            self._graph = CapturedIteration(
                self._run_iteration, xs, ys, inner_steps, device=self._groups[0].device, prepare=self._prepare_capture
            )
            for g in self._groups:
                g.theta_version = g.version()
            return
        self._graph.replay(xs, ys)

    def _capture_first_steps(self, xs: Tensor, inner_steps: int | None) -> set[bool]:
        """The first_step flags the iteration about to run (or be recorded) will launch with."""
        steps = xs.shape[0] if inner_steps is None else inner_steps
        if steps == 0:
            return set()
        return {self._fresh} | ({False} if steps > 1 else set())

    @torch.no_grad()
    def _prepare_capture(self, xs: Tensor, ys: Tensor, inner_steps: int | None) -> None:
        """Launch, on scratch copies, every kernel variant the recorded iteration will launch
        and the warm-up did not: Triton compiles (and tunes) a variant at its first launch,
        which must not happen inside a CUDA-graph capture.

        The only state-dependent variant is SGD's first-step rule: with
        ``reset_inner_state="never"`` and one inner step the warm-up iteration takes the
        first step (the momentum buffer is written, not read) and the recorded one a later
        step.  The scratch buffers have the real ones' lengths, dtypes and alignment, so
        the launch also fills the autotuner's cache for the recorded call.
        """
        if self.inner_optimizer != "sgd":
            return
        h = self.hyper
        for first_step in sorted(self._capture_first_steps(xs, inner_steps) - self._first_steps_launched):
            for g in self._groups:
                state = {key: g.state_buffer(key).clone().view(-1) for key in inner.state_keys("sgd", h)}
                update = g.update_buffer().clone().view(-1) if self.algorithm == "fomaml" else None
                inner.step_(
                    g.backend, "sgd", h, g.tasks.clone().view(-1), g.grad.clone().view(-1), state,
                    lr=g.lr_t if g.lr_t is not None else h["lr"], step=1, first_step=first_step, update=update,
                )  # fmt: skip
            self._first_steps_launched.add(first_step)

    def _run_iteration(self, xs: Tensor, ys: Tensor, inner_steps: int | None) -> None:
        if inner_steps is None:
            for step in range(xs.shape[0]):
                self.inner_step(xs[step], ys[step])
        else:
            for _ in range(inner_steps):
                self.inner_step(xs, ys)
        self.meta_step()

    def __repr__(self) -> str:
        return (
            f"BatchedReptile(n_tasks={self.n_tasks}, inner_optimizer={self.inner_optimizer!r}, "
            f"algorithm={self.algorithm!r}, "
            f"lr={self.lr}, meta_lr={self.meta_lr}, backends={self.backends}, capture={self.capture})"
        )
