"""The per-group flat state of a ``ReptileOptimizer`` (anchor, task sum, inner state, update buffer) and the operations on it."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from . import inner
from ._validate import opmath_dtype
from .backends import get_backend
from .flat import FlatBuffer
from .sharded import agree_nonfinite, step_local_shards


# The state_dict flag of an SGD entry whose momentum buffer holds nothing yet.  torch
# writes None there, but a loader that fills a template (dcp.load) needs a tensor in
# every phase, so the entry carries zeros and says they stand for "none yet".  Absent
# (torch's state dicts, this project's older ones): a momentum tensor is a filled buffer.
MOMENTUM_EMPTY = "momentum_buffer_empty"


def momentum_filled(entry: dict[str, Any]) -> bool:
    """Whether an SGD state_dict entry brings a momentum buffer that holds something."""
    return isinstance(entry.get("momentum_buffer"), Tensor) and not bool(entry.get(MOMENTUM_EMPTY, False))


class FlatState:
    """A flat buffer plus everything the optimizer keeps in its layout.

    The optimizer calls these operations; they call the :class:`FlatBuffer` and the
    backend, and never the optimizer.
    """

    def __init__(self, buffer: FlatBuffer, group_index: int, backend: str, inner_optimizer: str,
                 fused: bool = False):  # fmt: skip
        self.buffer = buffer
        self.group_index = group_index
        self.backend = get_backend(backend, buffer.device)
        self.inner_optimizer = inner_optimizer
        # Adam with torch.optim.Adam(fused=True)'s arithmetic, which treats each tensor's
        # tail apart: each segment's tensors as (offset, numel) pairs, made once per segment.
        self.fused = fused and inner_optimizer == "adam"
        self._spans: dict[tuple[int, int], tuple[int, ...]] = {}
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

    # ------------------------------------------------------------------ buffers

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

    def save_inner_state(self) -> tuple[dict[str, Tensor], list[int]]:
        """A copy of the inner state (one pass over its buffers), for rolling back a failed task."""
        return {k: v.clone() for k, v in self.state.items()}, list(self.steps)

    def restore_inner_state(self, saved: tuple[dict[str, Tensor], list[int]]) -> None:
        self.state, self.steps = saved

    # ------------------------------------------------------------------ inner loop

    def plan_step(self) -> tuple[list[bool] | None, list[tuple[int, Tensor]]]:
        """Checks before a step (layout, gradients), nothing modified: which parameters have
        a gradient (``None``: all, in the buffer) and those autograd put outside the buffer."""
        self.buffer.check_layout()
        return self.buffer.pending_grads()

    def step(self, group: dict, plan: tuple[list[bool] | None, list[tuple[int, Tensor]]], record: bool = False) -> None:
        """One inner step of the parameters that have gradients; with ``record`` each also
        writes its update into ``update`` (first-order MAML's last-step direction)."""
        active, foreign = plan
        b = self.buffer
        b.adopt_grads(foreign)
        state = {key: self.state_buffer(key) for key in inner.state_keys(self.inner_optimizer, group)}
        update = self.update_buffer() if record else None

        def step_part(param: Tensor, grad: Tensor, part: slice, steps: int, spans) -> None:
            inner.step_(
                self.backend, self.inner_optimizer, group, param, grad, {key: buf[part] for key, buf in state.items()},
                lr=group["lr"], step=steps + 1, first_step=steps == 0,
                update=None if update is None else update[part], fused=self.fused, spans=spans,
            )  # fmt: skip

        if b.sharded:  # FSDP2: each local shard in place, where FSDP all-gathers from
            step_local_shards(b, foreign, lambda i, param, grad, part: step_part(
                param, grad, part, self.steps[i], (0, param.numel()) if self.fused else None))  # fmt: skip
        else:
            # Parameters are grouped by step count: SGD's first-step rule applies to those whose
            # momentum buffer is still empty (count 0), Adam's bias corrections use the count.
            keys = self.steps if active is None else [s if a else None for s, a in zip(self.steps, active)]
            for steps, seg in b.segments(keys):
                part = slice(seg.start, seg.end)
                step_part(b.data[part], b.grad[part], part, steps, self.spans(seg) if self.fused else None)
        if record:
            self.update_fresh = [True] * len(b.params) if active is None else list(active)
        if self.inner_optimizer == "adam":
            self._count_steps(active)
        elif group["momentum"] != 0:
            self._count_steps(active, cap=1)

    def spans(self, seg) -> tuple[int, ...]:
        """The (offset, numel) pairs, flattened, of the parameters of segment ``seg``, relative to its start."""
        key = (seg.first, seg.last)
        spans = self._spans.get(key)
        if spans is None:
            b = self.buffer
            spans = tuple(x for i in range(seg.first, seg.last + 1) for x in (b.offsets[i] - seg.start, b.numels[i]))
            self._spans[key] = spans
        return spans

    def _count_steps(self, active: list[bool] | None, cap: int | None = None) -> None:
        """Advance the step counts of the parameters that stepped (SGD only needs 0 or ``cap=1``)."""

        def bump(s: int) -> int:
            return s + 1 if cap is None else cap

        if active is None:
            steps = self.steps
            # The common case, every count equal, costs one C-level pass.
            self.steps = [bump(steps[0])] * len(steps) if steps.count(steps[0]) == len(steps) else list(map(bump, steps))
        else:
            self.steps = [bump(s) if a else s for s, a in zip(self.steps, active)]

    # ------------------------------------------------------------------ outer loop

    def capture_anchor(self, count_slot: bool) -> None:
        """θ at the start of a meta-batch."""
        self.ensure_meta_buffers(count_slot)
        self.buffer.pull()
        self.anchor.copy_(self.buffer.data)

    def begin_task(self, reset: bool) -> tuple[dict[str, Tensor], list[int]]:
        """Start a task (with ``reset``, from empty inner state); returns what :meth:`abort_task` restores."""
        if reset:
            self.reset_inner_state()
        self.update_fresh = [False] * len(self.buffer.params)
        return self.save_inner_state()

    def abort_task(self, saved: tuple[dict[str, Tensor], list[int]]) -> None:
        """A failed task leaves nothing behind: θ back to the anchor, the inner state as it was."""
        self.reset_to_anchor()
        self.restore_inner_state(saved)

    def reset_to_anchor(self) -> None:
        """θ back to the meta-weights."""
        self.buffer.data.copy_(self.anchor)
        self.buffer.push()

    def end_task(self, fomaml: bool) -> None:
        """Add the task's contribution to the task sum and restore θ."""
        # First-order MAML: the task counts as if it had ended at anchor + last update.
        update = self.last_updates() if fomaml else None
        self.buffer.pull()
        self.backend.task_end_(self.buffer.data, self.anchor, self.acc, update)
        self.buffer.push()

    def _trainable_now(self) -> list | None:
        """Per parameter ``True``, or ``None`` for one frozen since packing (requires_grad_(False));
        ``None`` overall when none is."""
        params = self.buffer.params
        if all(p.requires_grad for p in params):
            return None
        return [True if p.requires_grad else None for p in params]

    def meta_update(self, meta_lr: float, n: float) -> None:
        """θ ← θ + meta_lr · (task sum / n − θ), and the task sum cleared.  A parameter frozen
        since packing is left exactly as it is (its mean of n equal values would round)."""
        keys = self._trainable_now()
        self.buffer.pull()
        if keys is None:
            self.backend.meta_update_(self.buffer.data, self.anchor, self.acc, meta_lr, n)
        else:
            for _, seg in self.buffer.segments(keys):
                part = slice(seg.start, seg.end)
                self.backend.meta_update_(self.buffer.data[part], self.anchor[part], self.acc[part], meta_lr, n)
            self.acc.zero_()
        self.buffer.push()

    def meta_gradient(self, n: float) -> None:
        """Write θ − task sum / n into the gradient and clear the task sum.  A parameter
        frozen since packing gets no gradient (``None``, so torch optimizers skip it)."""
        self.buffer.zero_grad(set_to_none=False)  # re-attaches views released by set_to_none
        self.buffer.grad.copy_(self.anchor.to(self.acc.dtype) - self.acc / n)
        self.acc.zero_()
        if self.buffer.sharded:
            self.buffer.attach_grads()
        keys = self._trainable_now()
        if keys is not None:
            for p, key in zip(self.buffer.params, keys):
                if key is None:
                    p.grad = None

    # ------------------------------------------------------------------ per-parameter entries

    def entry_keys(self, group: dict) -> tuple[str, ...]:
        """The inner-state tensors of parameter entries: those a step with ``group``'s
        hyperparameters uses, and any other buffer the state holds, in torch's order."""
        used = set(inner.state_keys(self.inner_optimizer, group)) | set(self.state)
        return tuple(k for k in inner.STATE_KEYS[self.inner_optimizer] if k in used)

    def has_inner_state(self, i: int) -> bool:
        """Whether parameter ``i``'s inner state holds anything (SGD: its momentum buffer; Adam: a step)."""
        return self.steps[i] > 0

    def inner_entry(self, i: int, group: dict) -> dict[str, Any]:
        """Parameter ``i``'s inner state as torch keeps it, views into the flat state.  Before
        its first step: SGD's ``momentum_buffer`` is ``None`` (torch's "no buffer yet": the
        first step copies the gradient), Adam's ``step`` is 0 with zero moments (where torch
        starts); reading that allocates Adam's buffers, as the first step would."""
        if self.inner_optimizer == "sgd":
            filled = self.steps[i] and "momentum_buffer" in self.state
            return {"momentum_buffer": self.buffer.view(self.state["momentum_buffer"], i) if filled else None}
        entry: dict[str, Any] = {"step": self.steps[i]}
        for key in self.entry_keys(group):
            entry[key] = self.buffer.view(self.state_buffer(key), i)
        return entry

    def _local_zeros(self, i: int, dtype: torch.dtype) -> Tensor:
        b = self.buffer
        return torch.zeros(b.numels[i], device=b.device, dtype=dtype).as_strided(b.shapes[i], b.strides[i])

    def saved_entry(self, i: int, group: dict, meta_batch_open: bool) -> dict[str, Any]:
        """Parameter ``i``'s state_dict entry, with the same keys in every phase (a loader
        that fills only a template's keys, as ``dcp.load`` does, gets everything): copies of
        its inner-state tensors (zeros where a buffer does not exist yet), what says whether
        that state is empty (Adam's ``step``; SGD's ``MOMENTUM_EMPTY``), and the anchor and
        task sum (zeros while no meta-batch is open).  The zeros are made here, each a tensor
        of its own (a loader may write into them), and no flat buffer is allocated for them."""
        b = self.buffer

        def saved(buf: Tensor | None, dtype: torch.dtype) -> Tensor:
            return b.wrap_entry(i, b.view(buf, i).clone() if buf is not None else self._local_zeros(i, dtype))

        # The flags are scalar tensors, as torch keeps Adam's step: dcp.load writes tensors
        # into the template in place, but files a Python number under the key's string
        # ("0" for parameter 0), which the template's own entry would not see.  int64: exact.
        entry: dict[str, Any] = {"step": torch.tensor(self.steps[i])} if self.inner_optimizer == "adam" else {}
        for key in self.entry_keys(group):
            entry[key] = saved(self.state.get(key), b.dtype)
        if "momentum_buffer" in entry:
            entry[MOMENTUM_EMPTY] = torch.tensor(not self.has_inner_state(i))
        entry["anchor"] = saved(self.anchor if meta_batch_open else None, b.dtype)
        entry["task_sum"] = saved(self.acc if meta_batch_open else None, opmath_dtype(b.dtype))
        return entry

    def clear_for_load(self, meta_batch_open: bool, count_slot: bool) -> None:
        """Empty inner state and task sum, before :meth:`load_entry` fills them."""
        self.reset_inner_state()
        if meta_batch_open:
            self.ensure_meta_buffers(count_slot)
        if self.acc is not None:
            self.acc.zero_()

    def load_entry(self, i: int, entry: dict[str, Any], meta_batch_open: bool) -> None:
        """Copy a checked state_dict entry into parameter ``i``'s slices.  Every tensor is
        copied (allocating the inner-state buffers, as a step would); the anchor and task
        sum only while the meta-batch is open (otherwise they are the zeros of the format)."""
        b = self.buffer
        for key, value in entry.items():
            if key == "step":
                self.steps[i] = int(value)
            elif key == MOMENTUM_EMPTY or value is None:  # None: torch's empty momentum buffer
                continue
            elif key in ("anchor", "task_sum"):
                if meta_batch_open:
                    b.view(self.anchor if key == "anchor" else self.acc, i).copy_(b.unwrap_entry(i, value))
            else:
                b.view(self.state_buffer(key), i).copy_(b.unwrap_entry(i, value))
        if "momentum_buffer" in entry:
            self.steps[i] = int(momentum_filled(entry))



def _nonfinite_where(f: FlatState, values: Tensor) -> str | None:
    """Which parameter of ``f`` holds a non-finite value of ``values`` (laid out like its buffer)."""
    if bool(torch.isfinite(values).all()):
        return None
    for i, shape in enumerate(f.buffer.shapes):
        if not bool(torch.isfinite(f.buffer.view(values, i)).all()):
            return f"parameter {i} of param group {f.group_index}, shape {tuple(shape)}"
    return f"param group {f.group_index}"


def first_nonfinite(flats: list[FlatState], fomaml: bool = False) -> str | None:
    """Where the first nan or inf of the flats' weights is (with ``fomaml``, of their
    recorded last updates too), in words; ``None`` when all are finite.

    FSDP2 shards are checked on every rank of their shard group, which then agrees (one
    all-reduce per buffer): those ranks ran the same task, so all roll back or none."""
    found = None
    for f in flats:
        f.buffer.pull()
        where = _nonfinite_where(f, f.buffer.data)
        if where is None and fomaml and f.update is not None:
            where = _nonfinite_where(f, f.last_updates())
        if f.buffer.sharded:
            where = agree_nonfinite(f.buffer, where)
        found = found or where
    return found


class _StateView(MutableMapping):
    """``ReptileOptimizer.state``: per-parameter views of the flat inner state.

    Every packed parameter has an entry from construction on (see
    :meth:`FlatState.inner_entry` for a never-stepped one), so the state is never empty:
    ``torch.distributed.checkpoint`` runs a zero-lr ``step()`` to create the state of an
    optimizer whose ``state`` is empty, which would count an Adam step, fill SGD's
    momentum buffer, or raise while a meta-batch is open."""

    def __init__(self, flats: list[FlatState], inner_optimizer: str, param_groups: list[dict]):
        self._flats = flats
        self._inner_optimizer = inner_optimizer
        self._groups = param_groups

    def _locate(self, p) -> tuple[FlatState, int]:
        for f in self._flats:
            for i, q in enumerate(f.buffer.params):
                if q is p:
                    return f, i
        raise KeyError(p)

    def _entry(self, f: FlatState, i: int) -> dict[str, Any]:
        entry = f.inner_entry(i, self._groups[f.group_index])
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
                elif key == "momentum_buffer" and v is None and self._inner_optimizer == "sgd":
                    f.steps[i] = 0  # torch's "no buffer yet"
                elif key in inner.STATE_KEYS[self._inner_optimizer]:
                    view = f.buffer.view(f.state_buffer(key), i)
                    if v is not view:
                        view.copy_(v)
                    if key == "momentum_buffer":
                        f.steps[i] = 1
                else:
                    raise KeyError(f"{key!r} is not a state entry of inner_optimizer={self._inner_optimizer!r}")

    def __delitem__(self, p) -> None:
        """Back to a never-stepped parameter's state (the parameter keeps its entry)."""
        f, i = self._locate(p)
        f.steps[i] = 0
        with torch.no_grad():
            for buf in f.state.values():  # Adam's next step reads its moments: zero, as torch starts
                f.buffer.view(buf, i).zero_()

    def __iter__(self):
        for f in self._flats:
            yield from f.buffer.params

    def __len__(self) -> int:
        return sum(len(f.buffer.params) for f in self._flats)

    def __repr__(self) -> str:
        return repr({tuple(p.shape): self._entry(*self._locate(p)) for p in self})
