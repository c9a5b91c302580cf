"""``ReptileOptimizer``: Reptile's inner and meta updates as a ``torch.optim`` optimizer.

Calls go down once: this torch.optim face -> :mod:`~reptile_fused.flat_state` (each
group's flat state) -> the flat buffer and the backend.  The state_dict format is in
:mod:`~reptile_fused.state_dict`, the scheduler view in :mod:`~reptile_fused.meta_schedule`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ddp, inner
from . import state_dict as _format
from .backends import get_backend
from .distributed import DEFAULT_BUCKET_ELEMENTS, MetaBatchSync, resolve_process_group
from .flat import FlatBuffer, check_group_params, check_memory_format
from .sharded import flat_buffer, task_group_of
from .flat_state import FlatState, _StateView, first_nonfinite
from .meta_schedule import MetaLRScheduler, MetaStepView
from .optimizer_settings import STATE_RESETS, NonFiniteError, OptimizerSettings, _check_reset, _MetaBatchState
from .state_dict import _rebuild

__all__ = ["ReptileOptimizer", "MetaStepView", "MetaLRScheduler", "NonFiniteError", "STATE_RESETS"]

# Pickles keep naming reptile_fused.optimizer._rebuild, as before state_dict.py existed.
_rebuild.__module__ = __name__


class ReptileOptimizer(OptimizerSettings, Optimizer):
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
            FSDP2 parameters (``fully_shard``) are stepped in place, shard by shard; their
            default group is the ranks that hold the same shards (a tasks × shards mesh's
            ``"tasks"`` dimension; none with 1-D FSDP), and a 1-D ``DeviceMesh`` is taken as
            its group (docs/distributed.md).
            Inside ``task()`` a DDP-wrapped model synchronises no gradients (:mod:`reptile_fused.ddp`).
        bucket_elements: all-reduce buffers larger than this in slices of this many elements.
        memory_format: the element order of each parameter inside the flat buffer (and
            so of ``p.data`` and ``p.grad``): ``None`` (default) keeps each parameter's
            own layout, ``torch.channels_last`` (``channels_last_3d``) lays the 4-D (5-D)
            parameters out as ``model.to(memory_format=...)`` would, ``torch.contiguous_format``
            makes every parameter row-major.  Values and updates are the same in every
            layout; convolutions can be much faster in one (see docs/benchmarks.md).
        fused: which of ``torch.optim.Adam``'s arithmetics the inner Adam reproduces, bit
            for bit on the CPU (``reference`` and ``cpp``).  ``None``/``False`` (default):
            the for-loop one, what ``torch.optim.Adam`` runs on the CPU unless asked for
            ``fused=True``, so replacing it keeps its numbers.  ``True``:
            ``torch.optim.Adam(fused=True)``'s (a correctly rounded square root), the fast
            one on the CPU: one pass over memory.  Inner SGD has one arithmetic; on CUDA
            both Adam arithmetics run one kernel, within a few ulp of torch
            (docs/numerics.md).
        foreach, capturable: accepted as torch accepts them; no effect.
            ``differentiable=True`` is refused (the steps run outside autograd).

    ``zero_grad()`` zeroes the flat gradient in one fill and keeps ``p.grad`` attached
    (torch's ``set_to_none=False``): a parameter that got no gradient is then updated
    with a zero gradient, exactly as torch does with zeroed grads.  ``zero_grad(set_to_none=True)``
    gives torch's default instead: gradients are released, and a parameter whose
    ``.grad`` is ``None`` at ``step()`` is skipped (its inner state untouched).
    Gradients that autograd allocated outside the flat buffer (after
    ``model.zero_grad()`` or any ``p.grad = None``) are copied in at ``step()``.
    NaN and inf in gradients propagate into the weights exactly as with
    ``torch.optim.SGD``/``Adam``; nothing is skipped silently, unless ``check_finite=True``:
    then a task whose adapted weights hold nan or inf is rolled back like a task that
    raised (θ, the inner state and the meta-batch as before it) and the ``with
    opt.task()`` block raises :class:`NonFiniteError`; a meta step whose result would
    not be finite leaves θ at the meta-weights, discards the meta-batch and raises it
    too.  The check reads every buffer once per task and per meta step (one device
    synchronisation each).

    ``algorithm`` and ``reset_inner_state`` may be set between meta-batches (checked
    like the constructor's arguments); ``inner_optimizer``, ``backend`` and
    ``memory_format`` are fixed at construction.
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
        check_finite: bool = False,
    ):
        check_memory_format(memory_format)
        inner.check_inner_optimizer(inner_optimizer)
        inner.check_algorithm(algorithm)
        inner.check_implementation_flags(dict(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable))
        _check_reset(reset_inner_state)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
        self._inner_optimizer = inner_optimizer
        self._backend = backend
        self._memory_format = memory_format
        self.check_finite = check_finite
        # Which torch.optim.Adam arithmetic the inner Adam matches (see the docstring).
        self.fused = bool(fused)
        self._flats: list[FlatState] = []
        self._frozen: list[Tensor] = []
        # Everything that changes between tasks lives in one object: a wrapper that copies
        # this optimizer's __dict__ or forwards attribute reads to it (Lightning's
        # LightningOptimizer, Accelerate's AcceleratedOptimizer) calls task()/meta_step()
        # with itself as ``self``; mutating this shared object, never assigning attributes
        # on ``self``, keeps one meta-batch whoever calls.
        self._meta = _MetaBatchState(self, algorithm, reset_inner_state)
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
        if inner_optimizer == "adam":
            inner.check_tensor_hyperparameters(defaults, foreach, capturable)
        super().__init__(params, defaults)
        if process_group is None and any(b.sharded for b in self.flat_buffers):  # FSDP2: tasks x shards
            group = task_group_of(self.flat_buffers)
        if group is not None:
            self._sync = MetaBatchSync(group, bucket_elements)
            self._sync.join(self._flats, [self.inner_optimizer, self.algorithm])

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (all checks pass before anything changes).

        As in torch, ``params`` may hold tensors or ``(name, tensor)`` pairs (named
        parameters; the names are kept in the group's ``param_names``).
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params, tensors, trainable, devices = check_group_params(param_group["params"])
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
        new = [
            FlatState(flat_buffer(dtype_params, self.memory_format), group_index, self.backend, self.inner_optimizer,
                      self.fused)
            for dtype_params in by_dtype.values()
        ]
        self._flats.extend(new)
        # Frozen now: not packed.  A gradient on one later is refused at step() (see _check_frozen).
        self._frozen.extend(p for p in tensors if not p.requires_grad)
        if self._sync is not None:  # after construction every rank must add the same group
            self._sync.join(new, [self.inner_optimizer, self.algorithm], self._flats)

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
        plans = [f.plan_step() for f in self._flats]  # every check before any update
        record = self.algorithm == "fomaml" and self._meta.in_task
        for f, plan in zip(self._flats, plans):
            f.step(self.param_groups[f.group_index], plan, record)
        return loss

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
            # What a failed task must not leave behind: the inner state it started from.
            saved = [f.begin_task(reset=self.reset_inner_state == "task") for f in self._flats]
        self._meta.in_task = True
        try:
            with ddp.local_gradients(p for f in self._flats for p in f.buffer.params):  # DDP: each rank its own tasks
                yield
        except BaseException:
            with torch.no_grad():
                for f, state in zip(self._flats, saved):
                    f.abort_task(state)
            self._meta.in_task = False
            raise
        with torch.no_grad():
            for f in self._flats:
                f.buffer.check_layout()
            bad = first_nonfinite(self._flats, fomaml=self.algorithm == "fomaml") if self.check_finite else None
            if bad is not None:  # rolled back like a task that raised
                for f, state in zip(self._flats, saved):
                    f.abort_task(state)
                self._meta.in_task = False
                raise NonFiniteError(
                    f"check_finite: the task's adapted weights hold nan or inf ({bad}): the task diverged. It was "
                    f"rolled back (the meta-batch keeps its {self._meta.tasks_done} finished task(s)); lower lr, or "
                    "skip such tasks by catching NonFiniteError"
                )
            for f in self._flats:
                f.end_task(fomaml=self.algorithm == "fomaml")
        self._meta.in_task = False
        self._meta.tasks_done += 1

    def _capture_anchor(self) -> None:
        for f in self._flats:
            f.capture_anchor(count_slot=self._sync is not None)

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
        for group in self.param_groups:  # a scheduler (or a user) may have written it
            # (a device tensor is not read here; under torch.compile a scheduled meta_lr is a
            # traced number, checked where it was set, as torch's optimizers skip such checks)
            if not isinstance(group["meta_lr"], Tensor) and not torch.compiler.is_compiling():
                inner.check_hyperparameters({"meta_lr": group["meta_lr"]})
        for f in self._flats:
            f.meta_update(self.param_groups[f.group_index]["meta_lr"], n)
        if self.check_finite:
            bad = first_nonfinite(self._flats)
            if bad is not None:
                for f in self._flats:  # θ back to the meta-weights (the anchor holds them)
                    f.reset_to_anchor()
                self._end_meta_batch()
                raise NonFiniteError(
                    f"check_finite: the meta step's result holds nan or inf ({bad}); the meta-weights are left as "
                    "they were and the meta-batch is discarded. Lower meta_lr (or lr)"
                )
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
            f.meta_gradient(n)
        self._end_meta_batch()

    def _end_meta_batch(self) -> None:
        self._meta.tasks_done = 0
        if self.reset_inner_state == "meta_step":
            for f in self._flats:
                f.reset_inner_state()
        if self._meta.view is not None:
            self._meta.view._opt_called = True

    @property
    def meta_optimizer(self) -> MetaStepView:
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
    def state(self) -> _StateView:
        """Each parameter's inner state, as ``torch.optim`` exposes it: ``opt.state[p]`` is
        ``{"momentum_buffer": ...}`` (SGD; ``None`` before its first step with momentum) or
        ``{"step": ..., "exp_avg": ..., "exp_avg_sq": ...[, "max_exp_avg_sq": ...]}`` (Adam;
        step 0 and zeros before its first step).  Every trainable parameter has an entry from
        construction on.  The tensors are views into the flat state buffers (writing to them
        changes the optimizer's state); assigning ``opt.state[p] = {...}`` copies values in."""
        return _StateView(self._flats, self.inner_optimizer, self.param_groups)

    @state.setter
    def state(self, value) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty dict; the real state lives in the flat buffers.
        if value:
            raise TypeError("ReptileOptimizer.state is a view of the flat buffers; assign opt.state[p] = {...} instead")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, even between the tasks of a meta-batch.

        Per-parameter entries (keyed by the parameter's index, as torch does) hold the inner
        optimizer state, the anchor and the task accumulator (``task_sum``), with the same
        keys in every phase (see :mod:`~reptile_fused.state_dict`).  Not allowed inside ``task()``.
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
        state_dict = _format.pack(
            self.param_groups, self._flats, inner_optimizer=self.inner_optimizer, algorithm=self.algorithm,
            reset_inner_state=self.reset_inner_state, tasks=self._meta.tasks_done,
        )  # fmt: skip
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
        self._meta.tasks_done = _format.unpack(
            state_dict, self.param_groups, self._flats, inner_optimizer=self.inner_optimizer,
            algorithm=self.algorithm, count_slot=self._sync is not None,
        )  # fmt: skip
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
