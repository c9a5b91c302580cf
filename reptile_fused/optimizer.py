"""``ReptileOptimizer``: Reptile's inner and meta updates as a ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import inner
from ._validate import opmath_dtype
from .backends import get_backend
from .distributed import DEFAULT_BUCKET_ELEMENTS, MetaBatchSync, resolve_process_group
from .flat import FlatBuffer, check_memory_format, check_trainable

STATE_RESETS = ("never", "task", "meta_step")
_FORMAT_VERSION = 1


class _Flat:
    """A flat buffer plus everything the optimizer keeps in its layout."""

    def __init__(self, buffer: FlatBuffer, group_index: int, backend: str):
        self.buffer = buffer
        self.group_index = group_index
        self.backend = get_backend(backend, buffer.device)
        self.state: dict[str, Tensor] = {}
        # Per parameter: SGD -> whether its momentum buffer holds anything yet;
        # Adam -> its step count.  Plain ints keep state_dict exact and cheap.
        self.steps = [0] * len(buffer.params)
        self.anchor: Tensor | None = None
        self.acc: Tensor | None = None
        # Distributed runs keep the task count in one extra trailing element, so a
        # single all-reduce per buffer carries both the sum of θ̃ and the count.
        self.acc_ext: Tensor | None = None

    def ensure_meta_buffers(self, count_slot: bool) -> None:
        if self.anchor is None:
            self.anchor = self.buffer.new_buffer()
            n = self.buffer.numel
            self.acc_ext = torch.zeros(n + int(count_slot), device=self.buffer.device, dtype=opmath_dtype(self.buffer.dtype))
            self.acc = self.acc_ext[:n]

    def state_buffer(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        if key not in self.state:
            self.state[key] = self.buffer.new_buffer(dtype)
        return self.state[key]

    def reset_inner_state(self) -> None:
        self.state.clear()
        self.steps = [0] * len(self.buffer.params)


class ReptileOptimizer(Optimizer):
    r"""Reptile (Nichol, Achiam & Schulman, 2018) as a drop-in ``torch.optim`` optimizer.

    Inner loop: ``step()`` is a plain SGD or Adam step (``torch.optim`` semantics) on the
    current weights.  Outer loop: every ``with opt.task():`` block starts from the
    meta-weights θ and, on exit, records the adapted weights θ̃ and restores θ;
    ``meta_step()`` then applies θ ← θ + meta_lr · mean(θ̃ᵢ − θ).

    Parameters are packed into one contiguous buffer per param group and dtype
    (``p.data`` and ``p.grad`` become views into it), so each update is one fused
    pass whatever the tensor count.  Memory: θ, the anchor (θ at the start of the
    meta-batch) and one task accumulator, plus the inner optimizer's state
    (one buffer for SGD with momentum, two for Adam, three with amsgrad); it does not
    grow with the meta-batch size.

    Args:
        params: tensors or param-group dicts, as for every torch optimizer.  All
            parameters of one group must be on one device.
        inner_optimizer: ``"sgd"`` (the paper's analysis) or ``"adam"`` (the
            authors' code, usually with ``betas=(0, 0.999)``).
        lr: inner learning rate.
        meta_lr: meta step size ε (``1.0`` makes θ the mean of the adapted weights).
        momentum, dampening, nesterov, weight_decay, maximize: as ``torch.optim.SGD``.
        betas, eps, amsgrad: as ``torch.optim.Adam`` (weight_decay and maximize too).
        reset_inner_state: when to forget the inner optimizer's state: ``"never"``
            (default, the authors' semantics: carried across tasks and meta-steps),
            ``"task"`` (every task starts fresh) or ``"meta_step"``.
        backend: ``"auto"`` (fastest available for the tensors' device),
            ``"reference"`` (pure PyTorch), ``"cpp"`` (C++/CUDA extension) or ``"triton"``.
        process_group: distributed meta-batches (see :mod:`reptile_fused.distributed`):
            ``None`` (default) synchronises over the world group when
            ``torch.distributed`` is initialised, a group object over that group,
            ``False`` never.  Each rank adapts its own tasks; ``meta_step()`` all-reduces
            the task accumulators (one collective per flat buffer) and every rank applies
            the same update.  Construction checks that every rank has the same parameter
            layout and broadcasts θ from rank 0.  Carried inner-optimizer state is per
            rank; with ``reset_inner_state="task"`` results do not depend on the world size.
        bucket_elements: all-reduce buffers larger than this in slices of this many elements.
        memory_format: the element order of each parameter inside the flat buffer (and
            so of ``p.data`` and ``p.grad``): ``None`` (default) keeps each parameter's
            own layout, ``torch.channels_last`` (``channels_last_3d``) lays the 4-D (5-D)
            parameters out as ``model.to(memory_format=...)`` would, ``torch.contiguous_format``
            makes every parameter row-major.  Values and updates are the same in every
            layout; convolutions can be much faster in one (see the README's benchmarks).

    ``zero_grad()`` zeroes the flat gradient in one fill and keeps ``p.grad`` attached
    (torch's ``set_to_none=False``): a parameter that got no gradient is then updated
    with a zero gradient, exactly as torch does with zeroed grads.  ``zero_grad(set_to_none=True)``
    gives torch's default instead: gradients are released, and a parameter whose
    ``.grad`` is ``None`` at ``step()`` is skipped (its inner state untouched).
    Gradients that autograd allocated outside the flat buffer (after
    ``model.zero_grad()`` or any ``p.grad = None``) are copied in at ``step()``.
    NaN and inf in gradients propagate into the weights exactly as with
    ``torch.optim.SGD``/``Adam``; nothing is skipped silently.
    """

    def __init__(
        self,
        params,
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
        reset_inner_state: str = "never",
        backend: str = "auto",
        process_group=None,
        bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
        memory_format=None,
    ):
        check_memory_format(memory_format)
        inner.check_inner_optimizer(inner_optimizer)
        if reset_inner_state not in STATE_RESETS:
            raise ValueError(f"reset_inner_state must be one of {STATE_RESETS}, got {reset_inner_state!r}")
        self.inner_optimizer = inner_optimizer
        self.reset_inner_state = reset_inner_state
        self.backend = backend
        self.memory_format = memory_format
        self._flats: list[_Flat] = []
        self._tasks_done = 0
        self._in_task = False
        self._meta_view: MetaStepView | None = None
        self._sync: MetaBatchSync | None = None
        group = resolve_process_group(process_group)
        defaults = dict(
            lr=lr,
            meta_lr=meta_lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            amsgrad=amsgrad,
            maximize=maximize,
        )
        inner.check_hyperparameters(defaults)
        super().__init__(params, defaults)
        if group is not None:
            self._sync = MetaBatchSync(group, bucket_elements)
            self._sync_new_flats(self._flats)

    def _sync_new_flats(self, flats: list[_Flat]) -> None:
        """Distributed: verify every rank has the same layout, then start all ranks from rank 0's θ."""
        self._sync.check_same_layout(self._layout_description())
        with torch.no_grad():
            for f in flats:
                self._sync.broadcast_(f.buffer.data)

    def _layout_description(self) -> list:
        """What must match across ranks for one all-reduce per buffer to add like to like:
        the element order inside each parameter's slice (its strides) included."""
        return [self.inner_optimizer] + [
            (f.group_index, str(f.buffer.dtype), [tuple(s) for s in f.buffer.shapes], f.buffer.strides)
            for f in self._flats
        ]

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (all checks pass before anything changes)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        trainable = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
        for p in params:
            check_trainable(p)
        devices = {p.device for p in trainable}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters of one param group must be on one device, got {sorted(map(str, devices))}; "
                "put each device's parameters in a group of its own"
            )
        inner.check_hyperparameters({**self.defaults, **param_group})
        if self._tasks_done or self._in_task:
            raise RuntimeError("add_param_group() in the middle of a meta-batch; call meta_step() first")
        # Resolve backends before the group is registered, so an unavailable backend changes nothing.
        for device in devices:
            get_backend(self.backend, device)
        super().add_param_group({**param_group, "params": params})
        group_index = len(self.param_groups) - 1
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in trainable:
            by_dtype.setdefault(p.dtype, []).append(p)
        new = [_Flat(FlatBuffer(dtype_params, self.memory_format), group_index, self.backend) for dtype_params in by_dtype.values()]
        self._flats.extend(new)
        if self._sync is not None:  # after construction every rank must add the same group
            self._sync_new_flats(new)

    @property
    def flat_buffers(self) -> list[FlatBuffer]:
        """The flat buffers, one per param group and dtype."""
        return [f.buffer for f in self._flats]

    @property
    def backends(self) -> list[str]:
        """The backend each flat buffer runs on (``"auto"`` resolved)."""
        return [f.backend.__name__.rsplit(".", 1)[-1] for f in self._flats]

    # ------------------------------------------------------------------ inner loop

    def zero_grad(self, set_to_none: bool = False) -> None:
        for f in self._flats:
            f.buffer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One inner optimizer step on the current weights.

        Inside ``task()`` it adapts to the task; outside any task it is plain
        fine-tuning of θ (not allowed while a meta-batch is open, since θ must stay the
        meta-weights until ``meta_step()``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._in_task and self._tasks_done:
            raise RuntimeError(
                "step() outside task() while a meta-batch is open: call meta_step() (or meta_gradient()) first"
            )
        plans = []
        for f in self._flats:
            f.buffer.check_layout()
            plans.append((f, *f.buffer.pending_grads()))
        for f, active, foreign in plans:
            f.buffer.adopt_grads(foreign)
            self._inner_step(f, self.param_groups[f.group_index], active)
        return loss

    @staticmethod
    def _step_keys(f: _Flat, active: list[bool] | None) -> list:
        """Each parameter's step count, or ``None`` for those without a gradient this step."""
        if active is None:
            return f.steps
        return [s if a else None for s, a in zip(f.steps, active)]

    @staticmethod
    def _count_steps(f: _Flat, active: list[bool] | None, cap: int | None = None) -> None:
        """Advance the step counts of the parameters that stepped (SGD only needs 0 or ``cap=1``)."""

        def bump(s: int) -> int:
            return s + 1 if cap is None else cap

        if active is None:
            steps = f.steps
            # The common case, every count equal, costs one C-level pass.
            f.steps = [bump(steps[0])] * len(steps) if steps.count(steps[0]) == len(steps) else list(map(bump, steps))
        else:
            f.steps = [bump(s) if a else s for s, a in zip(f.steps, active)]

    def _inner_step(self, f: _Flat, group: dict, active: list[bool] | None) -> None:
        b = f.buffer
        state = {key: f.state_buffer(key) for key in inner.state_keys(self.inner_optimizer, group)}
        # Parameters are grouped by step count: SGD's first-step rule applies to those
        # whose momentum buffer is still empty (count 0), Adam's bias corrections use the count.
        for steps, seg in b.segments(self._step_keys(f, active)):
            part = slice(seg.start, seg.end)
            inner.step_(
                f.backend, self.inner_optimizer, group, b.data[part], b.grad[part],
                {key: buf[part] for key, buf in state.items()},
                lr=group["lr"], step=steps + 1, first_step=steps == 0,
            )  # fmt: skip
        if self.inner_optimizer == "adam":
            self._count_steps(f, active)
        elif group["momentum"] != 0:
            self._count_steps(f, active, cap=1)

    # ------------------------------------------------------------------ outer loop

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Adapt to one task: on entry θ is the meta-weights; on exit the adapted
        weights are accumulated for ``meta_step()`` and θ is restored.

        If the block raises, the task is discarded: θ is restored and nothing is accumulated.
        """
        if self._in_task:
            raise RuntimeError("task() blocks cannot be nested: finish the current task first")
        for f in self._flats:
            f.buffer.check_layout()
        with torch.no_grad():
            if self._tasks_done == 0:
                self._capture_anchor()
            if self.reset_inner_state == "task":
                for f in self._flats:
                    f.reset_inner_state()
        self._in_task = True
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for f in self._flats:
                    f.buffer.data.copy_(f.anchor)
            self._in_task = False
            raise
        with torch.no_grad():
            for f in self._flats:
                f.buffer.check_layout()
            for f in self._flats:
                f.backend.task_end_(f.buffer.data, f.anchor, f.acc)
        self._in_task = False
        self._tasks_done += 1

    def _capture_anchor(self) -> None:
        for f in self._flats:
            f.ensure_meta_buffers(count_slot=self._sync is not None)
            f.anchor.copy_(f.buffer.data)

    @property
    def tasks_in_meta_batch(self) -> int:
        """How many tasks have finished since the last meta step."""
        return self._tasks_done

    def _close_meta_batch(self, what: str) -> float:
        """Checks, then the number of tasks in the meta-batch (summed over ranks when distributed)."""
        if self._in_task:
            raise RuntimeError(f"{what} inside task(): finish the task first")
        for f in self._flats:
            f.buffer.check_layout()
        if self._sync is None:
            if self._tasks_done == 0:
                raise RuntimeError(f"{what} before any task finished: run at least one `with opt.task():` block")
            return float(self._tasks_done)
        # Distributed: a rank may have no task of its own this time, but it must still
        # take part in the collective and apply the same update as the others.
        if self._tasks_done == 0:
            self._capture_anchor()
        for f in self._flats:
            f.acc_ext[-1].fill_(self._tasks_done)
            self._sync.all_reduce_sum_(f.acc_ext)
        # One host read per meta step: every rank sees the same global count, so a
        # meta-batch with no task anywhere fails identically on all ranks.
        total = float(self._flats[0].acc_ext[-1]) if self._flats else float(self._tasks_done)
        if total == 0:
            raise RuntimeError(f"{what} before any task finished on any rank")
        return total

    @torch.no_grad()
    def meta_step(self) -> None:
        """θ ← θ + meta_lr · mean(θ̃ᵢ − θ) over the tasks finished since the last meta step
        (on every rank's tasks, when distributed)."""
        n = self._close_meta_batch("meta_step()")
        for f in self._flats:
            meta_lr = self.param_groups[f.group_index]["meta_lr"]
            f.backend.meta_update_(f.buffer.data, f.anchor, f.acc, meta_lr, n)
        self._end_meta_batch()

    @torch.no_grad()
    def meta_gradient(self) -> None:
        """Write the Reptile meta-gradient θ − mean(θ̃ᵢ) into ``p.grad`` and end the meta-batch.

        θ stays the meta-weights; any torch optimizer over the same parameters can then
        take the outer step (``outer_opt.step()``), as with learn2learn.  ``meta_lr`` is
        not used: the outer optimizer's learning rate takes its place.
        """
        n = self._close_meta_batch("meta_gradient()")
        for f in self._flats:
            f.buffer.zero_grad(set_to_none=False)  # re-attaches views released by set_to_none
            f.buffer.grad.copy_(f.anchor.to(f.acc.dtype) - f.acc / n)
            f.acc.zero_()
        self._end_meta_batch()

    def _end_meta_batch(self) -> None:
        self._tasks_done = 0
        if self.reset_inner_state == "meta_step":
            for f in self._flats:
                f.reset_inner_state()
        if self._meta_view is not None:
            self._meta_view._opt_called = True

    @property
    def meta_optimizer(self) -> "MetaStepView":
        """An ``Optimizer`` view whose ``lr`` is each group's ``meta_lr`` and whose
        ``step()`` is ``meta_step()``: hand it to any ``torch.optim.lr_scheduler`` to
        anneal the meta step size, e.g. linearly to 0 as in the paper::

            sched = torch.optim.lr_scheduler.LinearLR(opt.meta_optimizer, 1.0, 0.0, total_iters=n_iters)
            ...
            opt.meta_step(); sched.step()
        """
        if self._meta_view is None:
            self._meta_view = MetaStepView(self)
        return self._meta_view

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, even between the tasks of a meta-batch.

        Per-parameter entries (keyed by the parameter's index, as torch does) hold the
        inner optimizer state and, while a meta-batch is open, the anchor and the task
        accumulator (``task_sum``).  Not allowed inside ``task()``.
        """
        if self._in_task:
            raise RuntimeError("state_dict() inside task(): save between tasks or after meta_step()")
        if self._tasks_done and self._sync is not None and self._sync.world_size > 1:
            raise RuntimeError(
                "state_dict() in the middle of a distributed meta-batch: the task sums are split over "
                "the ranks until meta_step(); save after meta_step()"
            )
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        state: dict[int, dict[str, Any]] = {}
        for f in self._flats:
            b = f.buffer
            for i, p in enumerate(b.params):
                entry: dict[str, Any] = {}
                if self.inner_optimizer == "adam" and f.steps[i]:
                    entry["step"] = f.steps[i]
                    for key in inner.STATE_KEYS["adam"]:
                        if key in f.state:
                            entry[key] = b.view(f.state[key], i).clone()
                elif self.inner_optimizer == "sgd" and f.steps[i] and "momentum_buffer" in f.state:
                    entry["momentum_buffer"] = b.view(f.state["momentum_buffer"], i).clone()
                if self._tasks_done:
                    entry["anchor"] = b.view(f.anchor, i).clone()
                    entry["task_sum"] = b.view(f.acc, i).clone()
                if entry:
                    state[index[id(p)]] = entry
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        return {
            "state": state,
            "param_groups": groups,
            "reptile": {
                "format": _FORMAT_VERSION,
                "inner_optimizer": self.inner_optimizer,
                "tasks_in_meta_batch": self._tasks_done,
                "reset_inner_state": self.reset_inner_state,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; every check passes before anything changes."""
        if self._in_task:
            raise RuntimeError("load_state_dict() inside task()")
        meta = state_dict.get("reptile")
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_VERSION:
            raise ValueError("not a ReptileOptimizer state_dict (missing or unknown 'reptile' section)")
        if meta["inner_optimizer"] != self.inner_optimizer:
            raise ValueError(
                f"state_dict is for inner_optimizer={meta['inner_optimizer']!r}, this optimizer uses {self.inner_optimizer!r}"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        params_by_index: dict[int, Tensor] = {}
        for g_saved, g_own in zip(groups, self.param_groups):
            if len(g_saved["params"]) != len(g_own["params"]):
                raise ValueError(
                    f"a param group has {len(g_saved['params'])} parameters in the state_dict and "
                    f"{len(g_own['params'])} here: it comes from a different model"
                )
            for idx, p in zip(g_saved["params"], g_own["params"]):
                params_by_index[idx] = p
        tasks = int(meta["tasks_in_meta_batch"])
        where: dict[int, tuple[_Flat, int]] = {}
        for f in self._flats:
            for i, p in enumerate(f.buffer.params):
                where[id(p)] = (f, i)
        saved_state = state_dict["state"]
        for idx, entry in saved_state.items():
            if idx not in params_by_index:
                raise ValueError(f"state_dict has state for parameter {idx}, which no param group lists")
            p = params_by_index[idx]
            if id(p) not in where:
                raise ValueError(f"state_dict has state for parameter {idx}, which is frozen here (requires_grad=False)")
            f, i = where[id(p)]
            for key, value in entry.items():
                if key == "step":
                    continue
                if not isinstance(value, Tensor) or value.shape != f.buffer.shapes[i]:
                    shape = getattr(value, "shape", None)
                    raise ValueError(
                        f"state_dict entry {key!r} of parameter {idx} has shape {tuple(shape) if shape is not None else shape}, "
                        f"expected {tuple(f.buffer.shapes[i])}: it comes from a different model"
                    )
            if tasks and ("anchor" not in entry or "task_sum" not in entry):
                raise ValueError(f"state_dict is mid-meta-batch but has no anchor for parameter {idx}")
        if tasks:
            missing = [idx for idx, p in params_by_index.items() if id(p) in where and idx not in saved_state]
            if missing:
                raise ValueError(f"state_dict is mid-meta-batch but has no anchor for parameters {missing}")

        # All checks passed: apply.
        for g_saved, g_own in zip(groups, self.param_groups):
            for k, v in g_saved.items():
                if k != "params":
                    g_own[k] = v
        with torch.no_grad():
            for f in self._flats:
                f.reset_inner_state()
                if tasks:
                    f.ensure_meta_buffers(count_slot=self._sync is not None)
                if f.acc is not None:
                    f.acc.zero_()
            for idx, entry in saved_state.items():
                f, i = where[id(params_by_index[idx])]
                b = f.buffer
                for key, value in entry.items():
                    if key == "step":
                        f.steps[i] = int(value)
                    elif key == "anchor":
                        b.view(f.anchor, i).copy_(value)
                    elif key == "task_sum":
                        b.view(f.acc, i).copy_(value)
                    else:
                        b.view(f.state_buffer(key), i).copy_(value)
                        if key == "momentum_buffer":
                            f.steps[i] = 1
        self._tasks_done = tasks


class _MetaLRGroup(MutableMapping):
    """A param group seen with ``meta_lr`` under the name ``lr`` (and its scheduler bookkeeping)."""

    _RENAMES = {"lr": "meta_lr", "initial_lr": "initial_meta_lr"}

    def __init__(self, group: dict):
        self._group = group

    def _key(self, key):
        return self._RENAMES.get(key, key)

    def __getitem__(self, key):
        return self._group[self._key(key)]

    def __setitem__(self, key, value):
        self._group[self._key(key)] = value

    def __delitem__(self, key):
        del self._group[self._key(key)]

    def __iter__(self):
        inverse = {v: k for k, v in self._RENAMES.items()}
        return (inverse.get(k, k) for k in self._group if k not in self._RENAMES)

    def __len__(self):
        return sum(1 for _ in self)


class MetaStepView(Optimizer):
    """The meta step of a ``ReptileOptimizer`` seen as an optimizer: ``lr`` is ``meta_lr``
    and ``step()`` is ``meta_step()``.  Exists so standard LR schedulers can anneal ε."""

    def __init__(self, owner: ReptileOptimizer):
        # Deliberately not calling Optimizer.__init__: this view owns no parameters.
        self._owner = owner
        self.defaults = {**owner.defaults, "lr": owner.defaults["meta_lr"]}
        self.state = {}
        self._opt_called = False

    @property
    def param_groups(self) -> list[_MetaLRGroup]:
        return [_MetaLRGroup(g) for g in self._owner.param_groups]

    def step(self, closure=None):
        self._owner.meta_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._owner.zero_grad(set_to_none)

    def state_dict(self):
        return self._owner.state_dict()

    def load_state_dict(self, state_dict):
        self._owner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"MetaStepView({self._owner.__class__.__name__})"

