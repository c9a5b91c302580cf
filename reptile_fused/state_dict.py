"""The ``ReptileOptimizer`` state_dict format: what ``state_dict()`` writes, and what ``load_state_dict()`` checks and restores.

Every trainable parameter has an entry with the same keys in every phase (construction,
between tasks, after ``meta_step()``), zero-filled where there is nothing yet, so a loader
that fills only the keys of a template (``torch.distributed.checkpoint``'s ``dcp.load``
into a fresh optimizer's ``state_dict()``) brings everything:

- the inner-state tensors a step uses (SGD with momentum: ``momentum_buffer``; Adam:
  ``exp_avg``, ``exp_avg_sq``, with amsgrad ``max_exp_avg_sq``), and, as scalar tensors,
  what says whether they hold anything yet: Adam's ``step`` (int64; 0: never stepped,
  where torch starts), SGD's ``momentum_buffer_empty`` (bool; True: the next step takes
  torch's first-step rule, the buffer becomes the gradient);
- ``anchor`` and ``task_sum``, the open meta-batch's θ and task accumulator (zeros when
  ``tasks_in_meta_batch`` is 0).

The groups carry ``tasks_in_meta_batch`` and ``inner_state_entries`` (how many of their
parameters have inner state), so what a loader dropped is refused instead of misread.
torch's own SGD/Adam state dicts and this format before zero-filling (entries only for
parameters with state, anchors only mid-meta-batch) load too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import inner
from .flat_state import MOMENTUM_EMPTY, FlatState, momentum_filled

_FORMAT_VERSION = 1
# Group entries the format adds to torch's; not hyperparameters, never loaded into a group.
_GROUP_EXTRAS = ("params", "tasks_in_meta_batch", "inner_state_entries")
_META_KEYS = ("anchor", "task_sum")
# What a parameter entry may hold, per inner optimizer.
_ENTRY_KEYS = {
    "sgd": frozenset(("momentum_buffer", MOMENTUM_EMPTY, *_META_KEYS)),
    "adam": frozenset(("step", *inner.STATE_KEYS["adam"], *_META_KEYS)),
}


def pack(
    param_groups: list[dict], flats: list[FlatState], *, inner_optimizer: str, algorithm: str,
    reset_inner_state: str, tasks: int,
) -> dict[str, Any]:  # fmt: skip
    """The state_dict of an optimizer with these groups and flat states, ``tasks`` tasks
    into its meta-batch (the format is described above)."""
    index = {}
    for group in param_groups:
        for p in group["params"]:
            index.setdefault(id(p), len(index))
    state: dict[int, dict[str, Any]] = {}
    stepped: set[int] = set()
    for f in flats:
        group = param_groups[f.group_index]
        for i, p in enumerate(f.buffer.params):
            state[index[id(p)]] = f.saved_entry(i, group, meta_batch_open=bool(tasks))
            if f.has_inner_state(i):
                stepped.add(id(p))
    groups = []
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = [index[id(p)] for p in group["params"]]
        # Also in the groups (not only in "reptile"): tools that keep only "state" and
        # "param_groups" (torch.distributed.checkpoint) then still resume exactly.
        packed["tasks_in_meta_batch"] = tasks
        # A template built with other hyperparameters (SGD without momentum for a checkpoint
        # with it) lacks the inner-state keys: the loader counts what came and refuses.
        packed["inner_state_entries"] = sum(1 for p in group["params"] if id(p) in stepped)
        groups.append(packed)
    return {
        "state": state,
        "param_groups": groups,
        "reptile": {
            "format": _FORMAT_VERSION,
            "inner_optimizer": inner_optimizer,
            "algorithm": algorithm,
            "tasks_in_meta_batch": tasks,
            "reset_inner_state": reset_inner_state,
        },
    }


def unpack(
    state_dict: dict[str, Any], param_groups: list[dict], flats: list[FlatState], *, inner_optimizer: str,
    algorithm: str, count_slot: bool,
) -> int:  # fmt: skip
    """Restore ``state_dict`` into the groups and flat states; every check passes before
    anything changes.  Returns the number of tasks in the restored meta-batch."""
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
    if saved_inner != inner_optimizer:
        raise ValueError(f"state_dict is for inner_optimizer={saved_inner!r}, this optimizer uses {inner_optimizer!r}")
    if len(groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(param_groups)}")
    params_by_index: dict[int, Tensor] = {}
    group_of: dict[int, int] = {}
    for n, (g_saved, g_own) in enumerate(zip(groups, param_groups)):
        if len(g_saved["params"]) != len(g_own["params"]):
            raise ValueError(
                f"a param group has {len(g_saved['params'])} parameters in the state_dict and "
                f"{len(g_own['params'])} here: it comes from a different model"
            )
        for idx, p in zip(g_saved["params"], g_own["params"]):
            params_by_index[idx] = p
            group_of[idx] = n
    saved_state = state_dict["state"]
    counts = {int(g["tasks_in_meta_batch"]) for g in groups if "tasks_in_meta_batch" in g}
    if meta is not None:
        counts.add(int(meta["tasks_in_meta_batch"]))
    if len(counts) > 1:
        raise ValueError(f"state_dict disagrees with itself on the tasks in the meta-batch: {sorted(counts)}")
    if not counts and any("anchor" in e or "task_sum" in e for e in saved_state.values()):
        raise ValueError("state_dict has a meta-batch's anchor but no count of its tasks ('tasks_in_meta_batch')")
    if not counts and any("meta_lr" in g for g in groups):
        raise ValueError(
            "state_dict has a ReptileOptimizer's param groups (they hold meta_lr) but no count of the tasks in "
            "its meta-batch ('tasks_in_meta_batch' in the groups or the 'reptile' section): something rebuilt "
            "the groups from another template (torch.distributed.checkpoint with "
            "flatten_optimizer_state_dict=True does), and the meta-batch and any SGD momentum flags are lost "
            "with it. Save and load with the default options."
        )
    tasks = counts.pop() if counts else 0
    saved_algorithm = meta.get("algorithm", "reptile") if meta is not None else None
    if tasks and saved_algorithm is not None and saved_algorithm != algorithm:
        raise ValueError(
            f"state_dict was saved mid-meta-batch with algorithm={saved_algorithm!r}; this optimizer uses "
            f"{algorithm!r}, so its finished tasks would count the wrong direction. Save after "
            "meta_step(), or load it into an optimizer with the same algorithm."
        )

    # The hyperparameters it brings pass the checks construction applies (lr=-1 or
    # meta_lr=nan would otherwise come in unchecked).
    merged_groups = []
    for n, (g_saved, g_own) in enumerate(zip(groups, param_groups)):
        merged = {k: v for k, v in g_own.items() if k != "params"}
        merged.update((k, v) for k, v in g_saved.items() if k not in _GROUP_EXTRAS)
        try:
            inner.check_hyperparameters(merged, inner_optimizer)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"state_dict param group {n}: {exc}") from None
        merged_groups.append(merged)

    where: dict[int, tuple[FlatState, int]] = {}
    for f in flats:
        for i, p in enumerate(f.buffer.params):
            where[id(p)] = (f, i)
    for idx, entry in saved_state.items():
        if idx not in params_by_index:
            raise ValueError(f"state_dict has state for parameter {idx}, which no param group lists")
        p = params_by_index[idx]
        if id(p) not in where:
            raise ValueError(f"state_dict has state for parameter {idx}, which is frozen here (requires_grad=False)")
        f, i = where[id(p)]
        _check_entry(idx, entry, f.buffer.entry_shape(i), inner_optimizer, merged_groups[group_of[idx]])
        if tasks and ("anchor" not in entry or "task_sum" not in entry):
            raise ValueError(f"state_dict is mid-meta-batch but has no anchor for parameter {idx}")
    if tasks:
        missing = [idx for idx, p in params_by_index.items() if id(p) in where and idx not in saved_state]
        if missing:
            raise ValueError(f"state_dict is mid-meta-batch but has no anchor for parameters {missing}")

    for n, g_saved in enumerate(groups):
        expected = int(g_saved.get("inner_state_entries", 0))
        present = sum(1 for idx in g_saved["params"] if _has_inner_state(saved_state.get(idx, {}), inner_optimizer))
        if present < expected:
            raise ValueError(
                f"state_dict param group {n} says {expected} parameter(s) had inner-optimizer state (momentum, "
                f"Adam moments) but only {present} came with it: it was read through a template with fewer keys "
                "(torch.distributed.checkpoint's dcp.load fills only its template's keys). Build the template "
                "from a ReptileOptimizer with the checkpoint's inner optimizer and hyperparameters (momentum, "
                "amsgrad); see docs/frameworks.md, torch.distributed.checkpoint."
            )

    # All checks passed: apply.
    for g_saved, g_own in zip(groups, param_groups):
        for k, v in g_saved.items():
            if k not in _GROUP_EXTRAS:
                g_own[k] = v
    with torch.no_grad():
        for f in flats:
            f.clear_for_load(meta_batch_open=bool(tasks), count_slot=count_slot)
        for idx, entry in saved_state.items():
            f, i = where[id(params_by_index[idx])]
            f.load_entry(i, entry, meta_batch_open=bool(tasks))
    return tasks


def _has_inner_state(entry: dict[str, Any], inner_optimizer: str) -> bool:
    """Whether a state_dict entry says its parameter has inner state (Adam: a step; SGD: a filled momentum buffer)."""
    if inner_optimizer == "sgd":
        return momentum_filled(entry)
    return "step" in entry and int(entry["step"]) > 0


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf and value == int(value)


def _check_entry(idx: int, entry: Any, shape: torch.Size, inner_optimizer: str, group: dict) -> None:
    """One parameter's state_dict entry: known keys, tensors of the parameter's shape, and
    every buffer its group's hyperparameters use when it says it has inner state."""
    if not isinstance(entry, dict):
        raise ValueError(f"state_dict entry of parameter {idx} is a {type(entry).__name__}, not a dict")
    for key, value in entry.items():
        if key not in _ENTRY_KEYS[inner_optimizer]:
            raise ValueError(f"state_dict entry {key!r} of parameter {idx} is not state of inner_optimizer={inner_optimizer!r}")
        if key == "step":
            if not _is_count(value.item() if isinstance(value, Tensor) and value.numel() == 1 else value):
                raise ValueError(f"state_dict entry 'step' of parameter {idx} is {value!r}, not a step count")
        elif key == MOMENTUM_EMPTY:
            if not (isinstance(value, bool) or isinstance(value, Tensor) and value.dtype == torch.bool and value.numel() == 1):
                raise ValueError(f"state_dict entry {key!r} of parameter {idx} must be True or False, got {value!r}")
        elif key == "momentum_buffer" and value is None:
            continue  # torch's "no buffer yet"
        elif not isinstance(value, Tensor) or value.shape != shape:
            got = getattr(value, "shape", None)
            raise ValueError(
                f"state_dict entry {key!r} of parameter {idx} has shape {tuple(got) if got is not None else got}, "
                f"expected {tuple(shape)}: it comes from a different model"
            )
    if _has_inner_state(entry, inner_optimizer):
        absent = [k for k in inner.state_keys(inner_optimizer, group) if not isinstance(entry.get(k), Tensor)]
        if absent:
            raise ValueError(
                f"state_dict entry of parameter {idx} has inner state but no {', '.join(absent)}, which its param "
                "group's hyperparameters use: it was saved, or read through a template, with other hyperparameters"
            )


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


def _rebuild(cls, groups, config, state_dict):
    """Unpickling (``ReptileOptimizer.__reduce_ex__``): a new optimizer over the groups, then its state."""
    opt = cls(groups, process_group=False, **config)
    opt.load_state_dict(state_dict)
    return opt
