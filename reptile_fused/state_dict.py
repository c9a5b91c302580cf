"""The ``ReptileOptimizer`` state_dict format: what ``state_dict()`` writes, and what ``load_state_dict()`` checks and restores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import inner
from .flat_state import FlatState

_FORMAT_VERSION = 1
_INNER_KEYS = frozenset(("step", *inner.STATE_KEYS["sgd"], *inner.STATE_KEYS["adam"]))
# Group entries the format adds to torch's; not hyperparameters, never loaded into a group.
_GROUP_EXTRAS = ("params", "tasks_in_meta_batch", "inner_state_entries")


def pack(
    param_groups: list[dict], flats: list[FlatState], *, inner_optimizer: str, algorithm: str,
    reset_inner_state: str, tasks: int,
) -> dict[str, Any]:  # fmt: skip
    """The state_dict of an optimizer with these groups and flat states, ``tasks`` tasks
    into its meta-batch.

    Per-parameter entries (keyed by the parameter's index, as torch does) hold the
    inner optimizer state and, while a meta-batch is open, the anchor and the task
    accumulator (``task_sum``).
    """
    index = {}
    for group in param_groups:
        for p in group["params"]:
            index.setdefault(id(p), len(index))
    state: dict[int, dict[str, Any]] = {}
    for f in flats:
        for i, p in enumerate(f.buffer.params):
            entry = f.saved_entry(i, meta_batch_open=bool(tasks))
            if entry:
                state[index[id(p)]] = entry
    groups = []
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = [index[id(p)] for p in group["params"]]
        # Also in the groups (not only in "reptile"): tools that keep only "state" and
        # "param_groups" (torch.distributed.checkpoint) then still resume exactly, and
        # a template without the meta-batch's anchors is refused instead of misread.
        packed["tasks_in_meta_batch"] = tasks
        # How many of the group's parameters carry inner state, so a loader that got
        # "state" only partly (dcp.load fills only its template's keys) is refused.
        packed["inner_state_entries"] = sum(
            1 for p in group["params"] if any(k in _INNER_KEYS for k in state.get(index[id(p)], ()))
        )
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
    for g_saved, g_own in zip(groups, param_groups):
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
    if tasks and saved_algorithm is not None and saved_algorithm != algorithm:
        raise ValueError(
            f"state_dict was saved mid-meta-batch with algorithm={saved_algorithm!r}; this optimizer uses "
            f"{algorithm!r}, so its finished tasks would count the wrong direction. Save after "
            "meta_step(), or load it into an optimizer with the same algorithm."
        )
    if not tasks and any("anchor" in e or "task_sum" in e for e in saved_state.values()):
        raise ValueError("state_dict has a meta-batch's anchor but no count of its tasks ('tasks_in_meta_batch')")
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
    for g_saved, g_own in zip(groups, param_groups):
        for k, v in g_saved.items():
            if k not in _GROUP_EXTRAS:
                g_own[k] = v
    with torch.no_grad():
        for f in flats:
            f.clear_for_load(meta_batch_open=bool(tasks), count_slot=count_slot)
        for idx, entry in saved_state.items():
            f, i = where[id(params_by_index[idx])]
            f.load_entry(i, entry)
    return tasks


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
