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

import traceback
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from ._validate import opmath_dtype
from .backends import get_backend
from .flat import FlatBuffer, check_memory_format
from .optimizer import _check_hyperparameters

__all__ = ["BatchedReptile", "NotBatchableError", "check_batchable"]

INNER_OPTIMIZERS = ("sgd", "adam")
# "task": every task of every meta-iteration starts with fresh inner state (what
# sequential ReptileOptimizer(reset_inner_state="task") does).  "never": task slot i
# carries its own state from one meta-iteration to the next.
BATCHED_STATE_RESETS = ("task", "never")
CAPTURE_MODES = (False, True, "auto")
_CAPTURABLE_BACKENDS = ("cpp", "triton")


class NotBatchableError(RuntimeError):
    """The model cannot run in batched mode; the message names the layer and the way out."""


def _running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name or type(model).__name__, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


def check_batchable(model: nn.Module) -> None:
    """Raise :class:`NotBatchableError` for layers that batched mode can never run.

    Normalisation layers that track running statistics update one shared buffer from
    every task; under ``vmap`` that is an in-place write of n different values into one
    tensor.  Reptile uses batch statistics anyway (``track_running_stats=False``).
    """
    bad = _running_stat_layers(model)
    if bad:
        name, m = bad[0]
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NotBatchableError(
            f"layer {name!r} ({type(m).__name__}){others} tracks running statistics, which batched mode "
            "cannot keep per task. Build it with track_running_stats=False (batch statistics, as in the "
            "Reptile paper), or use the sequential mode (ReptileOptimizer / reptile_train(batched=False))."
        )


def _failing_layer(exc: BaseException, model: nn.Module) -> str | None:
    """The innermost module of ``model`` whose ``forward`` is on the exception's traceback."""
    names = {id(m): (name or type(model).__name__, type(m).__name__) for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    return None if found is None else f"{found[0]!r} ({found[1]})"


_functorch = getattr(torch._C, "_functorch", None)
_CAN_FOLD = _functorch is not None and all(
    hasattr(_functorch, name)
    for name in ("is_batchedtensor", "maybe_get_level", "maybe_current_level", "_unwrap_batched", "_add_batch_dim")
)


def _fold_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch-statistics batch norm of n tasks as ONE batch norm over n·C channels.

    vmap's own rule for a batched weight normalises without the affine part and then
    applies it with separate broadcast multiply/add passes (forward and backward),
    which made batch norm cost the vmapped conv net more than the convolutions saved.
    Per-task statistics over (batch, space) of each channel are exactly per-channel
    statistics once the task dimension is folded into the channels, and the per-task
    weights become one [n·C] weight.  Returns NotImplemented for anything else.
    """
    if running_mean is not None or running_var is not None:
        return NotImplemented
    level = _functorch.maybe_current_level()
    if level is None or not _functorch.is_batchedtensor(input) or _functorch.maybe_get_level(input) != level:
        return NotImplemented
    x, x_dim = _functorch._unwrap_batched(input, level)
    if x.dim() < 3:
        return NotImplemented
    x = x.movedim(x_dim, 1)  # [B, n, C, ...]: vmapped convolutions already produce this layout
    batch, n, channels = x.shape[:3]
    affine = []
    for t in (weight, bias):
        if t is None:
            affine.append(None)
        elif _functorch.is_batchedtensor(t):
            if _functorch.maybe_get_level(t) != level:
                return NotImplemented
            value, dim = _functorch._unwrap_batched(t, level)
            affine.append(value.movedim(dim, 0).reshape(n * channels))
        else:  # shared by all tasks (a frozen affine parameter)
            affine.append(t.unsqueeze(0).expand(n, channels).reshape(n * channels))
    out = F.batch_norm(x.reshape(batch, n * channels, *x.shape[3:]), None, None, affine[0], affine[1], training, momentum, eps)
    return _functorch._add_batch_dim(out.view(batch, n, channels, *x.shape[3:]), 1, level)


def _fold_channelwise(func, logical_rank: int, input, *args, **kwargs):
    """A per-channel op (pooling) on n tasks as one op over n·C channels.

    vmap's pooling rules fold the task dimension into the *batch* dimension, which
    needs the [n, B, ...] layout, while vmapped convolutions produce [B, n·C, ...]:
    every pooling layer then cost two full copies of its input.  Pooling treats each
    channel independently, so folding the tasks into the channels is exact and free.
    """
    if kwargs.get("return_indices") or any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
        return NotImplemented
    level = _functorch.maybe_current_level()
    if level is None or not _functorch.is_batchedtensor(input) or _functorch.maybe_get_level(input) != level:
        return NotImplemented
    x, x_dim = _functorch._unwrap_batched(input, level)
    if x.dim() != logical_rank + 1:  # an unbatched [C, ...] input has no batch dimension to keep
        return NotImplemented
    x = x.movedim(x_dim, 1)
    batch, n, channels = x.shape[:3]
    out = func(x.reshape(batch, n * channels, *x.shape[3:]), *args, **kwargs)
    return _functorch._add_batch_dim(out.view(batch, n, channels, *out.shape[2:]), 1, level)


def _unwrap_at(t, level: int, dim: int):
    """``t``'s physical tensor with the task dimension at ``dim``, or None if it is not batched at ``level``."""
    if not _functorch.is_batchedtensor(t) or _functorch.maybe_get_level(t) != level:
        return None
    value, bdim = _functorch._unwrap_batched(t, level)
    return value.movedim(bdim, dim)


def _conv_per_task(func, logical_rank: int, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """On the CPU, a vmapped convolution as n plain convolutions.

    vmap turns per-task weights into one grouped convolution, and oneDNN's grouped
    kernels run up to 2x slower on the CPU than n ungrouped ones of the same total
    size (32->32 channels at 42x42: 95 ms against 42 ms), which made the batched
    Mini-ImageNet-style net slower than the sequential loop.  ``unbind``/``stack``
    keep the backward to one copy each way.  CUDA keeps vmap's grouped convolution.
    """
    level = _functorch.maybe_current_level()
    if level is None or not isinstance(input, Tensor) or input.device.type != "cpu":
        return NotImplemented
    x = _unwrap_at(input, level, 1)
    w = _unwrap_at(weight, level, 0)
    if x is None or w is None or x.dim() != logical_rank + 1:
        return NotImplemented
    if bias is not None:
        b = _unwrap_at(bias, level, 0)
        biases = b.unbind(0) if b is not None else [bias] * w.shape[0]
        if b is None and _functorch.is_batchedtensor(bias):
            return NotImplemented
    else:
        biases = [None] * w.shape[0]
    outs = [
        func(xi, wi, bi, stride, padding, dilation, groups)
        for xi, wi, bi in zip(x.unbind(1), w.unbind(0), biases)
    ]
    return _functorch._add_batch_dim(torch.stack(outs, 1), 1, level)


_PER_TASK_CONV = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}

_CHANNELWISE = {
    F.max_pool1d: 3, F.max_pool2d: 4, F.max_pool3d: 5,
    F.avg_pool1d: 3, F.avg_pool2d: 4, F.avg_pool3d: 5,
    F.adaptive_avg_pool1d: 3, F.adaptive_avg_pool2d: 4, F.adaptive_avg_pool3d: 5,
}


class _FoldTasksIntoChannels(TorchFunctionMode):
    """Routes batch norm and pooling calls on vmapped tasks to the folded versions above,
    keeping the [B, n·C, ...] layout of vmapped convolutions from layer to layer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _fold_batch_norm(*args, **kwargs)
        elif func in _CHANNELWISE and args:
            out = _fold_channelwise(func, _CHANNELWISE[func], *args, **kwargs)
        elif func in _PER_TASK_CONV and not kwargs:
            out = _conv_per_task(func, _PER_TASK_CONV[func], *args)
        else:
            out = NotImplemented
        if out is not NotImplemented:
            return out
        return func(*args, **kwargs)


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
    ``capture=True`` records as one CUDA graph).

    ``xs`` / ``ys`` hold one batch per task, stacked: ``xs[i]`` is what the model sees
    for task i.  Task i's loss is ``loss_fn(model(xs[i]), ys[i])`` with task i's weights.

    Args:
        model: the network.  Normalisation layers must use batch statistics
            (``track_running_stats=False``); see :func:`check_batchable`.
        n_tasks: the meta-batch size n (rows of the task buffer).
        inner_optimizer: ``"sgd"`` or ``"adam"``; hyperparameters as in
            :class:`~reptile_fused.ReptileOptimizer` (``lr``, ``momentum``, ``betas``, ...).
        meta_lr: meta step size ε.
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
    state (SGD with momentum: 1 buffer, Adam: 2, with amsgrad 3): ``O(n·P)``, against
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
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        reset_inner_state: str = "task",
        randomness: str = "different",
        backend: str = "auto",
        capture: bool | str = False,
        memory_format=None,
    ):
        if not isinstance(n_tasks, int) or isinstance(n_tasks, bool) or n_tasks < 1:
            raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
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
        _check_hyperparameters(hyper)
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
        self.reset_inner_state = reset_inner_state
        self.loss_fn = loss_fn
        self.hyper = hyper
        self._groups = [_Group(params, n_tasks, backend, memory_format) for params in by_key.values()]
        self._params = {
            name: leaf for g in self._groups for name, leaf in zip(g.names, g.leaves)
        }
        self._task_losses = vmap(self._task_loss, in_dims=(0, 0, 0), randomness=randomness)
        self._steps_pending = 0  # inner steps since the last meta step
        self._fresh = True  # the inner state holds nothing yet (SGD's first-step rule)
        self._adam_step = 0  # shared by all rows: every row steps together
        self._capture_requested = capture
        self.capture = self._resolve_capture(capture)
        self._graph = None
        self._graph_key = None
        self._static: tuple[Tensor, Tensor] | None = None
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
        reason = None
        devices = {g.device.type for g in self._groups}
        if devices != {"cuda"}:
            reason = f"CUDA graphs need CUDA tensors, the model's parameters are on {sorted(devices)}"
        else:
            slow = sorted({g.backend_name for g in self._groups if g.backend_name not in _CAPTURABLE_BACKENDS})
            if slow:
                reason = (
                    f"backend {slow[0]!r} reads lr/meta_lr/step on the host, which a CUDA graph cannot hold; "
                    "capture needs the 'cpp' or 'triton' backend on CUDA"
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
        _check_hyperparameters({**self.hyper, key: value})
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
                if _CAN_FOLD:
                    with _FoldTasksIntoChannels():
                        losses = self._task_losses(self._params, xs, ys)
                else:
                    losses = self._task_losses(self._params, xs, ys)
            except Exception as exc:
                layer = _failing_layer(exc, self.model)
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
        for g in self._groups:
            tasks, grad = g.tasks.view(-1), g.grad.view(-1)
            lr = g.lr_t if g.lr_t is not None else h["lr"]
            if self.inner_optimizer == "sgd":
                buf = g.state_buffer("momentum_buffer").view(-1) if h["momentum"] != 0 else None
                g.backend.sgd_step_(
                    tasks, grad, buf, lr, momentum=h["momentum"], dampening=h["dampening"],
                    weight_decay=h["weight_decay"], nesterov=h["nesterov"], maximize=h["maximize"],
                    first_step=self._fresh,
                )
            else:
                if g.step_t is not None:
                    g.step_t.add_(1)
                    step = g.step_t
                else:
                    step = self._adam_step + 1
                g.backend.adam_step_(
                    tasks, grad, g.state_buffer("exp_avg").view(-1), g.state_buffer("exp_avg_sq").view(-1),
                    g.state_buffer("max_exp_avg_sq").view(-1) if h["amsgrad"] else None,
                    step, lr, beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                    weight_decay=h["weight_decay"], amsgrad=h["amsgrad"], maximize=h["maximize"],
                )
        self._adam_step += 1
        self._fresh = False
        self._steps_pending += 1
        return losses

    # ------------------------------------------------------------------ outer loop

    @torch.no_grad()
    def meta_step(self) -> None:
        """θ ← θ + meta_lr · mean(θ̃ᵢ − θ); every task row restarts from the new θ."""
        for g in self._groups:
            g.theta.check_layout()
        if self._steps_pending == 0:
            self._sync_rows()
        for g in self._groups:
            meta_lr = g.meta_lr_t if g.meta_lr_t is not None else self.hyper["meta_lr"]
            g.backend.batched_meta_update_(g.theta.data, g.tasks, meta_lr, write_back=True)
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
        key = (inner_steps, tuple(xs.shape), xs.dtype, xs.device, tuple(ys.shape), ys.dtype, ys.device)
        if self._graph is not None and key != self._graph_key:
            message = (
                f"the graph was captured for inputs {self._describe(self._graph_key)}, this call has "
                f"{self._describe(key)}; a CUDA graph replays fixed shapes"
            )
            if self._capture_requested is True:
                raise ValueError(f"capture=True: {message}. Keep shapes fixed, or use capture=False/'auto'.")
            if not self._warned_shapes:
                warnings.warn(f"BatchedReptile(capture='auto'): {message}; running eagerly.", stacklevel=2)
                self._warned_shapes = True
            self._run_iteration(xs, ys, inner_steps)
            return
        if self._graph is None:
            self._record(xs, ys, inner_steps, key)
            return
        self._sync_rows()
        static_x, static_y = self._static
        static_x.copy_(xs)
        static_y.copy_(ys)
        self._graph.replay()

    @staticmethod
    def _describe(key) -> str:
        steps, xshape, xdtype, xdev, yshape, ydtype, ydev = key
        return f"xs {list(xshape)} {xdtype} on {xdev}, ys {list(yshape)} {ydtype} on {ydev}, inner_steps={steps}"

    def _run_iteration(self, xs: Tensor, ys: Tensor, inner_steps: int | None) -> None:
        if inner_steps is None:
            for step in range(xs.shape[0]):
                self.inner_step(xs[step], ys[step])
        else:
            for _ in range(inner_steps):
                self.inner_step(xs, ys)
        self.meta_step()

    def _record(self, xs: Tensor, ys: Tensor, inner_steps: int | None, key) -> None:
        for t in (xs, ys):
            if t.device.type != "cuda":
                raise ValueError(f"capture: xs and ys must be CUDA tensors, got one on {t.device}")
        self._sync_rows()
        static_x, static_y = xs.clone(), ys.clone()
        side = torch.cuda.Stream(device=static_x.device)
        side.wait_stream(torch.cuda.current_stream(static_x.device))
        # The warm-up is this call's real meta-iteration; it also initialises autograd,
        # the allocator and the lazily created state buffers outside the capture.
        with torch.cuda.stream(side):
            self._run_iteration(static_x, static_y, inner_steps)
        torch.cuda.current_stream(static_x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run_iteration(static_x, static_y, inner_steps)
        # Capturing records without running: the warm-up already did this call's work.
        self._graph, self._graph_key, self._static = graph, key, (static_x, static_y)
        for g in self._groups:
            g.theta_version = g.version()

    def __repr__(self) -> str:
        return (
            f"BatchedReptile(n_tasks={self.n_tasks}, inner_optimizer={self.inner_optimizer!r}, "
            f"lr={self.lr}, meta_lr={self.meta_lr}, backends={self.backends}, capture={self.capture})"
        )
