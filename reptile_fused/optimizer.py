"""``ReptileOptimizer``: Reptile's inner and meta updates as a ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
import math
import weakref
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
        # First-order MAML: each in-task step writes its own update here (opmath dtype,
        # like acc), so at the task's end it holds the last step's θ̃ − θ_{k-1}.  Per
        # parameter, whether its slice holds this task's last step (a parameter that
        # did not step at the last step contributes zero).
        self.update: Tensor | None = None
        self.update_fresh = [False] * len(buffer.params)

    def ensure_meta_buffers(self, count_slot: bool) -> None:
        if self.anchor is None:
            self.anchor = self.buffer.new_buffer()
            n = self.buffer.numel
            self.acc_ext = torch.zeros(n + int(count_slot), device=self.buffer.device, dtype=opmath_dtype(self.buffer.dtype))
            self.acc = self.acc_ext[:n]

    def update_buffer(self) -> Tensor:
        if self.update is None:
            self.update = self.buffer.new_buffer(opmath_dtype(self.buffer.dtype))
        return self.update

    def last_updates(self) -> Tensor:
        """The update buffer with every parameter that did not take this task's last step zeroed."""
        update = self.update_buffer()
        stale = [None if fresh else True for fresh in self.update_fresh]
        for _, seg in self.buffer.segments(stale):
            update[seg.start : seg.end].zero_()
        return update

    def state_buffer(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        if key not in self.state:
            self.state[key] = self.buffer.new_buffer(dtype)
        return self.state[key]

    def reset_inner_state(self) -> None:
        self.state.clear()
        self.steps = [0] * len(self.buffer.params)

    def inner_entry(self, i: int, inner_optimizer: str) -> dict[str, Any]:
        """Parameter ``i``'s inner state as torch keeps it (views into the flat state; ``step`` an int)."""
        if not self.steps[i]:
            return {}
        entry: dict[str, Any] = {"step": self.steps[i]} if inner_optimizer == "adam" else {}
        for key in inner.STATE_KEYS[inner_optimizer]:
            if key in self.state:
                entry[key] = self.buffer.view(self.state[key], i)
        return entry

    def save_inner_state(self) -> tuple[dict[str, Tensor], list[int]]:
        """A copy of the inner state (one pass over its buffers), for rolling back a failed task."""
        return {k: v.clone() for k, v in self.state.items()}, list(self.steps)

    def restore_inner_state(self, saved: tuple[dict[str, Tensor], list[int]]) -> None:
        self.state, self.steps = saved


class _MetaBatchState:
    """The meta-batch bookkeeping of one ``ReptileOptimizer``, shared by reference with any wrapper."""

    __slots__ = ("owner_ref", "tasks_done", "in_task", "view")

    def __init__(self, owner: "ReptileOptimizer"):
        self.owner_ref = weakref.ref(owner)
        self.tasks_done = 0  # tasks finished since the last meta step
        self.in_task = False
        self.view: MetaStepView | None = None

    @property
    def owner(self) -> "ReptileOptimizer":
        return self.owner_ref()


class ReptileOptimizer(Optimizer):
    r"""Reptile (Nichol, Achiam & Schulman, 2018) as a drop-in ``torch.optim`` optimizer.

    Inner loop: ``step()`` is a plain SGD or Adam step (``torch.optim`` semantics) on the
    current weights.  Outer loop: every ``with opt.task():`` block starts from the
    meta-weights θ and, on exit, records the adapted weights θ̃ and restores θ;
    ``meta_step()`` then applies θ ← θ + meta_lr · mean(θ̃ᵢ − θ).

    With ``algorithm="fomaml"`` (first-order MAML, as the Reptile authors' ``--foml``)
    a task contributes its last inner step's update instead of its whole adaptation:
    θ ← θ + meta_lr · mean(θ̃ᵢ − θᵢ,ₖ₋₁), where θᵢ,ₖ₋₁ are task i's weights before its
    last ``step()``.  With SGD that update is −lr·gᵢ,ₖ (the gradient at θᵢ,ₖ₋₁), so one
    inner step per task makes the two algorithms the same.

    Parameters are packed into one contiguous buffer per param group and dtype
    (``p.data`` and ``p.grad`` become views into it), so each update is one fused
    pass whatever the tensor count.  Memory: θ, the anchor (θ at the start of the
    meta-batch) and one task accumulator, plus the inner optimizer's state
    (one buffer for SGD with momentum, two for Adam, three with amsgrad); it does not
    grow with the meta-batch size.  ``"fomaml"`` keeps one more buffer, the last
    step's update (float32 for 16-bit parameters), which every in-task ``step()``
    writes in the same pass that takes the step.

    Args:
        params: tensors or param-group dicts, as for every torch optimizer.  All
            parameters of one group must be on one device.
        inner_optimizer: ``"sgd"`` (the paper's analysis) or ``"adam"`` (the
            authors' code, usually with ``betas=(0, 0.999)``).
        lr: inner learning rate.
        meta_lr: meta step size ε (``1.0`` makes θ the mean of the adapted weights).
        momentum, dampening, nesterov, weight_decay, maximize: as ``torch.optim.SGD``.
        betas, eps, amsgrad: as ``torch.optim.Adam`` (weight_decay and maximize too).
        algorithm: ``"reptile"`` (default) or ``"fomaml"``: what each task contributes
            to the meta step (see above).
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
        lr: float | Tensor = 1e-3,
        meta_lr: float = 1.0,
        momentum: float | None = None,
        dampening: float | None = None,
        nesterov: bool | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        amsgrad: bool | None = None,
        maximize: bool = False,
        *,
        algorithm: str = "reptile",
        reset_inner_state: str = "never",
        backend: str = "auto",
        process_group=None,
        bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
        memory_format=None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool | None = None,
        differentiable: bool = False,
    ):
        check_memory_format(memory_format)
        inner.check_inner_optimizer(inner_optimizer)
        inner.check_algorithm(algorithm)
        inner.check_implementation_flags(dict(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable))
        if reset_inner_state not in STATE_RESETS:
            raise ValueError(f"reset_inner_state must be one of {STATE_RESETS}, got {reset_inner_state!r}")
        self.inner_optimizer = inner_optimizer
        self.algorithm = algorithm
        self.reset_inner_state = reset_inner_state
        self.backend = backend
        self.memory_format = memory_format
        self._flats: list[_Flat] = []
        self._frozen: list[Tensor] = []
        # Everything that changes between tasks lives in one object: a wrapper that copies
        # this optimizer's __dict__ or forwards attribute reads to it (Lightning's
        # LightningOptimizer, Accelerate's AcceleratedOptimizer) calls task()/meta_step()
        # with itself as ``self``; mutating this shared object, never assigning attributes
        # on ``self``, keeps one meta-batch whoever calls.
        self._meta = _MetaBatchState(self)
        self._sync: MetaBatchSync | None = None
        group = resolve_process_group(process_group)
        given = dict(
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
            betas=betas, eps=eps, amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip
        # Only the chosen inner optimizer's hyperparameters: schedulers (OneCycleLR,
        # CyclicLR) look for "momentum" or "betas" in the groups to decide what to cycle.
        defaults = {**inner.hyperparameters(inner_optimizer, given), "meta_lr": meta_lr}
        inner.check_hyperparameters(defaults, inner_optimizer)
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
        return [self.inner_optimizer, self.algorithm] + [
            (f.group_index, str(f.buffer.dtype), [tuple(s) for s in f.buffer.shapes], f.buffer.strides)
            for f in self._flats
        ]

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (all checks pass before anything changes).

        As in torch, ``params`` may hold tensors or ``(name, tensor)`` pairs (named
        parameters; the names are kept in the group's ``param_names``).
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
                "in sets will change between runs. Please use a list instead."
            )
        params = [params] if isinstance(params, Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        for p in tensors:
            check_trainable(p)
        if len({id(p) for p in tensors}) != len(tensors):
            # torch.optim warns and then steps such a parameter once per listing.
            raise ValueError(
                "a parameter is listed twice in one param group: torch.optim would step it twice per step(); "
                "ReptileOptimizer packs each parameter once, so it refuses. List every parameter once."
            )
        trainable = [p for p in tensors if p.requires_grad]
        devices = {p.device for p in trainable}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters of one param group must be on one device, got {sorted(map(str, devices))}; "
                "put each device's parameters in a group of its own"
            )
        inner.hyperparameters(self.inner_optimizer, {k: v for k, v in param_group.items() if k != "params"})
        inner.check_hyperparameters({**self.defaults, **param_group}, self.inner_optimizer)
        if self._meta.tasks_done or self._meta.in_task:
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
        # Frozen now: not packed.  A gradient on one later is refused at step() (see _check_frozen).
        self._frozen.extend(p for p in tensors if not p.requires_grad)
        if self._sync is not None:  # after construction every rank must add the same group
            self._sync_new_flats(new)

    def _check_frozen(self) -> None:
        for p in self._frozen:
            if p.grad is not None:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} was frozen (requires_grad=False) when it was handed to "
                    "this ReptileOptimizer and now has a gradient: only parameters trainable at construction are "
                    "packed into the flat buffers and stepped, and torch.optim would step it. Unfreeze before "
                    "building the optimizer (gradual unfreezing: build a new optimizer after each unfreeze)."
                )

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
        if not self._meta.in_task and self._meta.tasks_done:
            raise RuntimeError(
                "step() outside task() while a meta-batch is open: call meta_step() (or meta_gradient()) first"
            )
        if self._frozen:
            self._check_frozen()
        plans = []
        for f in self._flats:
            f.buffer.check_layout()
            plans.append((f, *f.buffer.pending_grads()))
        record = self.algorithm == "fomaml" and self._meta.in_task
        for f, active, foreign in plans:
            f.buffer.adopt_grads(foreign)
            self._inner_step(f, self.param_groups[f.group_index], active, record)
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

    def _inner_step(self, f: _Flat, group: dict, active: list[bool] | None, record: bool = False) -> None:
        """One step of the parameters that have gradients; with ``record`` each also
        writes its update into ``f.update`` (first-order MAML's last-step direction)."""
        b = f.buffer
        state = {key: f.state_buffer(key) for key in inner.state_keys(self.inner_optimizer, group)}
        update = f.update_buffer() if record else None
        # Parameters are grouped by step count: SGD's first-step rule applies to those
        # whose momentum buffer is still empty (count 0), Adam's bias corrections use the count.
        for steps, seg in b.segments(self._step_keys(f, active)):
            part = slice(seg.start, seg.end)
            inner.step_(
                f.backend, self.inner_optimizer, group, b.data[part], b.grad[part],
                {key: buf[part] for key, buf in state.items()},
                lr=group["lr"], step=steps + 1, first_step=steps == 0,
                update=None if update is None else update[part],
            )  # fmt: skip
        if record:
            f.update_fresh = [True] * len(b.params) if active is None else list(active)
        if self.inner_optimizer == "adam":
            self._count_steps(f, active)
        elif group["momentum"] != 0:
            self._count_steps(f, active, cap=1)

    # ------------------------------------------------------------------ outer loop

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Adapt to one task: on entry θ is the meta-weights; on exit the adapted
        weights are accumulated for ``meta_step()`` and θ is restored.

        If the block raises, the task is discarded: θ and the inner optimizer's state
        (momentum, Adam moments and step counts) are restored and nothing is accumulated.
        With ``algorithm="fomaml"`` the task contributes its last ``step()``'s update
        (zero for a parameter that had no gradient at that step, and for all of them
        when the task took no step).
        To make that possible the inner state is copied on entry (one pass over it, and
        one more copy of it in memory while the task runs; nothing with
        ``reset_inner_state="task"``'s empty state).
        """
        if self._meta.in_task:
            raise RuntimeError("task() blocks cannot be nested: finish the current task first")
        for f in self._flats:
            f.buffer.check_layout()
        with torch.no_grad():
            if self._meta.tasks_done == 0:
                self._capture_anchor()
            if self.reset_inner_state == "task":
                for f in self._flats:
                    f.reset_inner_state()
            for f in self._flats:
                f.update_fresh = [False] * len(f.buffer.params)
            # What a failed task must not leave behind: the inner state it started from.
            saved = [f.save_inner_state() for f in self._flats]
        self._meta.in_task = True
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for f, state in zip(self._flats, saved):
                    f.buffer.data.copy_(f.anchor)
                    f.restore_inner_state(state)
            self._meta.in_task = False
            raise
        with torch.no_grad():
            for f in self._flats:
                f.buffer.check_layout()
            for f in self._flats:
                # First-order MAML: the task counts as if it had ended at anchor + last update.
                update = f.last_updates() if self.algorithm == "fomaml" else None
                f.backend.task_end_(f.buffer.data, f.anchor, f.acc, update)
        self._meta.in_task = False
        self._meta.tasks_done += 1

    def _capture_anchor(self) -> None:
        for f in self._flats:
            f.ensure_meta_buffers(count_slot=self._sync is not None)
            f.anchor.copy_(f.buffer.data)

    @property
    def tasks_in_meta_batch(self) -> int:
        """How many tasks have finished since the last meta step."""
        return self._meta.tasks_done

    def _close_meta_batch(self, what: str) -> float:
        """Checks, then the number of tasks in the meta-batch (summed over ranks when distributed)."""
        if self._meta.in_task:
            raise RuntimeError(f"{what} inside task(): finish the task first")
        for f in self._flats:
            f.buffer.check_layout()
        if self._sync is None:
            if self._meta.tasks_done == 0:
                raise RuntimeError(f"{what} before any task finished: run at least one `with opt.task():` block")
            return float(self._meta.tasks_done)
        # Distributed: a rank may have no task of its own this time, but it must still
        # take part in the collective and apply the same update as the others.
        if self._meta.tasks_done == 0:
            self._capture_anchor()
        for f in self._flats:
            f.acc_ext[-1].fill_(self._meta.tasks_done)
            self._sync.all_reduce_sum_(f.acc_ext)
        # One host read per meta step: every rank sees the same global count, so a
        # meta-batch with no task anywhere fails identically on all ranks.
        total = float(self._flats[0].acc_ext[-1]) if self._flats else float(self._meta.tasks_done)
        if total == 0:
            raise RuntimeError(f"{what} before any task finished on any rank")
        return total

    @torch.no_grad()
    def meta_step(self) -> None:
        """θ ← θ + meta_lr · mean(θ̃ᵢ − θ) over the tasks finished since the last meta step
        (on every rank's tasks, when distributed); with ``algorithm="fomaml"``,
        θ ← θ + meta_lr · mean(θ̃ᵢ − θᵢ,ₖ₋₁)."""
        n = self._close_meta_batch("meta_step()")
        for f in self._flats:
            meta_lr = self.param_groups[f.group_index]["meta_lr"]
            f.backend.meta_update_(f.buffer.data, f.anchor, f.acc, meta_lr, n)
        self._end_meta_batch()

    @torch.no_grad()
    def meta_gradient(self) -> None:
        """Write the Reptile meta-gradient θ − mean(θ̃ᵢ) into ``p.grad`` and end the meta-batch
        (with ``algorithm="fomaml"``: −mean(θ̃ᵢ − θᵢ,ₖ₋₁), the last steps' updates negated).

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
        self._meta.tasks_done = 0
        if self.reset_inner_state == "meta_step":
            for f in self._flats:
                f.reset_inner_state()
        if self._meta.view is not None:
            self._meta.view._opt_called = True

    @property
    def meta_optimizer(self) -> "MetaStepView":
        """An ``Optimizer`` view whose ``lr`` is each group's ``meta_lr`` and whose
        ``step()`` is ``meta_step()``: hand it to any ``torch.optim.lr_scheduler`` to
        anneal the meta step size, e.g. linearly to 0 as in the paper::

            sched = torch.optim.lr_scheduler.LinearLR(opt.meta_optimizer, 1.0, 0.0, total_iters=n_iters)
            ...
            opt.meta_step(); sched.step()
        """
        if self._meta.view is None:
            self._meta.view = MetaStepView(self._meta.owner)
        return self._meta.view

    @property
    def state(self) -> "_StateView":
        """Each parameter's inner state, as ``torch.optim`` exposes it: ``opt.state[p]`` is
        ``{"momentum_buffer": ...}`` (SGD with momentum) or ``{"step": ..., "exp_avg": ...,
        "exp_avg_sq": ...[, "max_exp_avg_sq": ...]}`` (Adam), empty before the parameter's
        first step.  The tensors are views into the flat state buffers (writing to them
        changes the optimizer's state); assigning ``opt.state[p] = {...}`` copies values in."""
        return _StateView(self)

    @state.setter
    def state(self, value) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty dict; the real state lives in the flat buffers.
        if value:
            raise TypeError("ReptileOptimizer.state is a view of the flat buffers; assign opt.state[p] = {...} instead")

    def __reduce_ex__(self, protocol):
        # copy.deepcopy and pickle rebuild the optimizer over (copies of) its parameters
        # and restore its state_dict; copied together with its model, the copy steps the
        # copied model's parameters.
        if self._sync is not None:
            raise TypeError(
                "a distributed ReptileOptimizer cannot be copied or pickled; save opt.state_dict() instead"
            )
        config = dict(
            inner_optimizer=self.inner_optimizer, algorithm=self.algorithm,
            reset_inner_state=self.reset_inner_state, backend=self.backend,
            memory_format=self.memory_format,
        )  # fmt: skip
        groups = [dict(g) for g in self.param_groups]
        return (_rebuild, (type(self), groups, config, self.state_dict()))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (inner_optimizer={self.inner_optimizer!r}, algorithm={self.algorithm!r}, "
                 f"backends={self.backends}, "
                 f"reset_inner_state={self.reset_inner_state!r}, tasks_in_meta_batch={self._meta.tasks_done})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {v}" for k, v in sorted(group.items()) if k not in ("params", "param_names"))
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, even between the tasks of a meta-batch.

        Per-parameter entries (keyed by the parameter's index, as torch does) hold the
        inner optimizer state and, while a meta-batch is open, the anchor and the task
        accumulator (``task_sum``).  Not allowed inside ``task()``.
        """
        if self._meta.in_task:
            raise RuntimeError("state_dict() inside task(): save between tasks or after meta_step()")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if self._meta.tasks_done and self._sync is not None and self._sync.world_size > 1:
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
                entry = {k: v if k == "step" else v.clone() for k, v in f.inner_entry(i, self.inner_optimizer).items()}
                if self._meta.tasks_done:
                    entry["anchor"] = b.view(f.anchor, i).clone()
                    entry["task_sum"] = b.view(f.acc, i).clone()
                if entry:
                    state[index[id(p)]] = entry
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in group["params"]]
            # Also in the groups (not only in "reptile"): tools that keep only "state" and
            # "param_groups" (torch.distributed.checkpoint) then still resume exactly, and
            # a template without the meta-batch's anchors is refused instead of misread.
            packed["tasks_in_meta_batch"] = self._meta.tasks_done
            # How many of the group's parameters carry inner state, so a loader that got
            # "state" only partly (dcp.load fills only its template's keys) is refused.
            packed["inner_state_entries"] = sum(
                1 for p in group["params"] if any(k in _INNER_KEYS for k in state.get(index[id(p)], ()))
            )
            groups.append(packed)
        state_dict = {
            "state": state,
            "param_groups": groups,
            "reptile": {
                "format": _FORMAT_VERSION,
                "inner_optimizer": self.inner_optimizer,
                "algorithm": self.algorithm,
                "tasks_in_meta_batch": self._meta.tasks_done,
                "reset_inner_state": self.reset_inner_state,
            },
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; every check passes before anything changes."""
        if self._meta.in_task:
            raise RuntimeError("load_state_dict() inside task()")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (it needs 'state' and 'param_groups')")
        groups = state_dict["param_groups"]
        meta = state_dict.get("reptile")
        if meta is not None:
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT_VERSION:
                raise ValueError("not a ReptileOptimizer state_dict (unknown 'reptile' section)")
            saved_inner = meta["inner_optimizer"]
        else:
            # Tools that keep only "state" and "param_groups" (torch.distributed.checkpoint):
            # the groups name the inner optimizer by its hyperparameters.
            saved_inner = _inner_optimizer_of(groups)
        if saved_inner != self.inner_optimizer:
            raise ValueError(
                f"state_dict is for inner_optimizer={saved_inner!r}, this optimizer uses {self.inner_optimizer!r}"
            )
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
        saved_state = state_dict["state"]
        counts = {int(g["tasks_in_meta_batch"]) for g in groups if "tasks_in_meta_batch" in g}
        if meta is not None:
            counts.add(int(meta["tasks_in_meta_batch"]))
        if len(counts) > 1:
            raise ValueError(f"state_dict disagrees with itself on the tasks in the meta-batch: {sorted(counts)}")
        tasks = counts.pop() if counts else 0
        saved_algorithm = meta.get("algorithm", "reptile") if meta is not None else None
        if tasks and saved_algorithm is not None and saved_algorithm != self.algorithm:
            raise ValueError(
                f"state_dict was saved mid-meta-batch with algorithm={saved_algorithm!r}; this optimizer uses "
                f"{self.algorithm!r}, so its finished tasks would count the wrong direction. Save after "
                "meta_step(), or load it into an optimizer with the same algorithm."
            )
        if not tasks and any("anchor" in e or "task_sum" in e for e in saved_state.values()):
            raise ValueError("state_dict has a meta-batch's anchor but no count of its tasks ('tasks_in_meta_batch')")
        where: dict[int, tuple[_Flat, int]] = {}
        for f in self._flats:
            for i, p in enumerate(f.buffer.params):
                where[id(p)] = (f, i)
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

        for n, g_saved in enumerate(groups):
            expected = int(g_saved.get("inner_state_entries", 0))
            present = sum(1 for idx in g_saved["params"] if any(k in _INNER_KEYS for k in saved_state.get(idx, ())))
            if present < expected:
                raise ValueError(
                    f"state_dict param group {n} says {expected} parameter(s) had inner-optimizer state (momentum, "
                    f"Adam moments) but only {present} came with it. torch.distributed.checkpoint's dcp.load fills "
                    "only the keys of the template it is given: build the template from an optimizer that has "
                    "stepped (see the README's section on training frameworks)."
                )

        # All checks passed: apply.
        for g_saved, g_own in zip(groups, self.param_groups):
            for k, v in g_saved.items():
                if k not in ("params", "tasks_in_meta_batch", "inner_state_entries"):
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
        self._meta.tasks_done = tasks
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


_INNER_KEYS = frozenset(("step", *inner.STATE_KEYS["sgd"], *inner.STATE_KEYS["adam"]))


def _inner_optimizer_of(groups: list[dict]) -> str | None:
    """The inner optimizer a state_dict's param groups were saved with: Adam's groups hold
    ``betas``, SGD's ``momentum`` (each holds only its own optimizer's hyperparameters)."""
    kinds = {"adam" if "betas" in g else "sgd" if "momentum" in g else None for g in groups}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(
            "not a ReptileOptimizer state_dict: no 'reptile' section, and its param groups do not name "
            "one inner optimizer (Adam's hold 'betas', SGD's 'momentum')"
        )
    return kinds.pop()


class _MetaLRGroup(MutableMapping):
    """A param group seen from the meta step: ``lr`` is ``meta_lr``, and nothing of the inner
    optimizer shows (so a scheduler cannot mistake the inner Adam's betas or SGD's momentum
    for the meta step's).  Keys a scheduler adds are kept in the group under ``meta_``
    (``initial_lr`` as ``initial_meta_lr``)."""

    _RENAMES = {"lr": "meta_lr", "initial_lr": "initial_meta_lr"}

    def __init__(self, group: dict):
        self._group = group

    def _key(self, key):
        if key == "params":
            return key
        return self._RENAMES.get(key, f"meta_{key}")

    def __getitem__(self, key):
        return self._group[self._key(key)]

    def __setitem__(self, key, value):
        self._group[self._key(key)] = value

    def __delitem__(self, key):
        del self._group[self._key(key)]

    def __iter__(self):
        inverse = {v: k for k, v in self._RENAMES.items()}
        for k in self._group:
            if k == "params" or k in inverse:
                yield inverse.get(k, k)
            elif k.startswith("meta_"):
                yield k[len("meta_") :]

    def __len__(self):
        return sum(1 for _ in self)


class MetaStepView(Optimizer):
    """The meta step of a ``ReptileOptimizer`` seen as an optimizer: ``lr`` is ``meta_lr``
    and ``step()`` is ``meta_step()``.  Exists so standard LR schedulers can anneal ε."""

    def __init__(self, owner: ReptileOptimizer):
        # Deliberately not calling Optimizer.__init__: this view owns no parameters.
        self._owner = owner
        self.defaults = {"lr": owner.defaults["meta_lr"]}
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


class MetaLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler on ``opt.meta_optimizer`` presented as a scheduler of ``opt`` itself.

    For frameworks that accept only schedulers of the optimizers they were given
    (PyTorch Lightning's ``configure_optimizers``)::

        sched = MetaLRScheduler(LinearLR(opt.meta_optimizer, 1.0, 0.0, total_iters=n))
        return {"optimizer": opt, "lr_scheduler": sched}

    ``optimizer`` is the ``ReptileOptimizer``; ``step()``, ``get_last_lr()``,
    ``state_dict()`` and ``load_state_dict()`` are the wrapped scheduler's, so it anneals
    each group's ``meta_lr`` and never the inner ``lr``.
    """

    def __init__(self, scheduler):
        # Deliberately not calling LRScheduler.__init__: it would take a step of its own
        # and write ``initial_lr`` into the inner optimizer's groups.
        view = getattr(scheduler, "optimizer", None)
        if not isinstance(view, MetaStepView):
            raise TypeError(
                "MetaLRScheduler wraps a scheduler built on a ReptileOptimizer's meta_optimizer, e.g. "
                "MetaLRScheduler(LinearLR(opt.meta_optimizer, ...)); got one on "
                f"{type(view).__name__}"
            )
        self.scheduler = scheduler
        self.optimizer = view._owner

    def step(self, *args, **kwargs) -> None:
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def get_lr(self):
        return self.scheduler.get_lr()

    @property
    def last_epoch(self) -> int:
        return self.scheduler.last_epoch

    @property
    def base_lrs(self) -> list[float]:
        return self.scheduler.base_lrs

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"MetaLRScheduler({type(self.scheduler).__name__} on meta_lr)"


def _rebuild(cls, groups, config, state_dict):
    opt = cls(groups, process_group=False, **config)
    opt.load_state_dict(state_dict)
    return opt


class _StateView(MutableMapping):
    """``ReptileOptimizer.state``: per-parameter views of the flat inner state."""

    def __init__(self, opt: ReptileOptimizer):
        self._opt = opt

    def _locate(self, p) -> tuple[_Flat, int]:
        for f in self._opt._flats:
            for i, q in enumerate(f.buffer.params):
                if q is p:
                    return f, i
        raise KeyError(p)

    def _entry(self, f: _Flat, i: int) -> dict[str, Any]:
        entry = f.inner_entry(i, self._opt.inner_optimizer)
        if "step" in entry:  # torch keeps Adam's step as a float32 tensor
            entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
        return entry

    def __getitem__(self, p) -> dict[str, Any]:
        if not isinstance(p, Tensor):
            raise KeyError(p)
        return self._entry(*self._locate(p))

    def __setitem__(self, p, value: dict[str, Any]) -> None:
        f, i = self._locate(p)
        with torch.no_grad():
            for key, v in value.items():
                if key == "step":
                    f.steps[i] = int(v.item() if isinstance(v, Tensor) else v)
                elif key in inner.STATE_KEYS[self._opt.inner_optimizer]:
                    view = f.buffer.view(f.state_buffer(key), i)
                    if v is not view:
                        view.copy_(v)
                    if key == "momentum_buffer":
                        f.steps[i] = 1
                else:
                    raise KeyError(f"{key!r} is not a state entry of inner_optimizer={self._opt.inner_optimizer!r}")

    def __delitem__(self, p) -> None:
        f, i = self._locate(p)
        f.steps[i] = 0

    def __iter__(self):
        for f in self._opt._flats:
            for i, p in enumerate(f.buffer.params):
                if f.steps[i]:
                    yield p

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr({tuple(p.shape): self._entry(*self._locate(p)) for p in self})
