"""FSDP2 (``fully_shard``) parameters: DTensors whose local shards FSDP owns.

FSDP2 keeps each parameter's local shard in storage of its own and all-gathers from
that storage before every forward, so a ``ReptileOptimizer`` over such parameters
must update the shards where they live: repacking them into a flat buffer (as
:class:`~reptile_fused.flat.FlatBuffer` does for plain tensors) would leave FSDP
gathering stale copies.  :class:`ShardedFlatBuffer` therefore keeps the flat layout
for everything the optimizer owns (inner state, anchor, task sum, update) and steps
each local shard in place, one fused backend call per parameter, against its slices
of those buffers.  Once per task and meta step the shards are copied into a flat
mirror (``data``) so the task-end and meta-step kernels still run once per buffer.

Only FSDP2's own placement is taken: ``Shard(0)`` on a 1-D mesh.  Every update rule
is elementwise, so each rank's shard steps exactly as its rows of the whole parameter
would in a single process.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from .flat import FlatBuffer, _replacements

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = None
    Shard = None


def is_dtensor(p) -> bool:
    return DTensor is not None and isinstance(p, DTensor)


def check_fsdp_param(i: int, p: Tensor) -> None:
    """Refuse, in one line, a DTensor parameter that is not FSDP2-sharded."""
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"parameter {i} of shape {tuple(p.shape)} is a DTensor with placements {tuple(p.placements)} on a "
            f"{mesh.ndim}-D mesh: ReptileOptimizer steps FSDP2-sharded parameters (fully_shard: (Shard(dim=0),) on "
            "a 1-D mesh) and plain tensors; tensor parallel, HSDP and other placements are not supported"
        )
    local = p.to_local()
    if not local.is_contiguous():
        raise ValueError(f"parameter {i}: its local shard is not contiguous (strides {local.stride()})")


class ShardedFlatBuffer(FlatBuffer):
    """The optimizer's flat layout over FSDP2 parameters' local shards.

    ``shapes``/``numels`` are the local shards'; ``data`` is a mirror of the shards that
    :meth:`pull` fills and :meth:`push` writes back (one more buffer of the shard's size);
    ``grad`` holds what ``meta_gradient()`` writes, made on its first call.  Parameters are
    never re-pointed: ``p`` stays FSDP's.
    """

    sharded = True

    def __init__(self, params: list[Tensor], memory_format=None):
        if memory_format is not None:
            raise ValueError("memory_format= applies to plain parameters; FSDP2 keeps its shards row-major")
        self._take(params)
        self.serial = -1
        self.mesh = self.params[0].device_mesh
        for i, p in enumerate(self.params):
            check_fsdp_param(i, p)
            if p.device_mesh != self.mesh:
                raise ValueError(
                    f"parameter {i} is sharded over a different device mesh than parameter 0: one param group's "
                    "FSDP2 parameters must share one mesh (put each mesh's parameters in a group of its own)"
                )
        shards = self.local_shards()
        self._lay_out([t.shape for t in shards], [t.stride() for t in shards])
        self._grad: Tensor | None = None
        self._fsdp_modules: list | None = None  # weak references, found on first write
        self._data_views = [self._view(self.data, i) for i in range(len(self.params))]
        self.pull()

    @property
    def grad(self) -> Tensor:
        """Where ``meta_gradient()`` writes; made on first use (the inner steps read FSDP's gradients)."""
        if self._grad is None:
            self._grad = torch.zeros(self.numel, device=self.device, dtype=self.dtype)
        return self._grad

    @property
    def grad_views(self) -> list[Tensor]:
        return [self._view(self.grad, i) for i in range(len(self.params))]

    # ------------------------------------------------------------------ the shards

    def reshard_modules(self) -> None:
        """Make FSDP's next forward gather the shards this optimizer is about to write.

        A forward without a backward (an evaluation under ``torch.no_grad()``) leaves
        FSDP2's root module unsharded, and its next forward reuses those weights instead
        of all-gathering the shards: the θ a task end or a meta step writes would be
        skipped.  ``FSDPModule.reshard()`` (public, a no-op when sharded) drops them."""
        if self._fsdp_modules is None:
            self._fsdp_modules = fsdp_modules_of(self.params)
            if self._fsdp_modules is None:
                self._fsdp_modules = []
                warnings.warn(
                    "ReptileOptimizer could not find the FSDP2 modules of its parameters (FSDP's internal state "
                    "changed in this torch): after a forward without backward, call model.reshard() yourself "
                    "before the optimizer writes the weights (task end, meta_step)",
                    stacklevel=3,
                )
        for ref in self._fsdp_modules:
            module = ref()
            if module is not None:
                module.reshard()

    def local_shards(self) -> list[Tensor]:
        with torch.no_grad():  # to_local() then hands out FSDP's own tensor, not an autograd view
            return [p.to_local() for p in self.params]

    def pull(self) -> None:
        """The shards' current values into the mirror ``data``."""
        torch._foreach_copy_(self._data_views, self.local_shards())

    def push(self) -> None:
        """The mirror ``data`` back into the shards, where FSDP all-gathers from."""
        self.reshard_modules()
        torch._foreach_copy_(self.local_shards(), self._data_views)

    def check_layout(self) -> None:
        if _replacements[0] != self._replacements_seen:
            self._check_replaced()
        for i, p in enumerate(self.params):
            if not is_dtensor(p) or p.device != self.device or p.dtype != self.dtype:
                self._moved(i, p)
            with torch.no_grad():
                local = p.to_local()
            if local.shape != self.shapes[i] or not local.is_contiguous():
                raise RuntimeError(
                    f"parameter {i}: its local shard is now {tuple(local.shape)}, it was {tuple(self.shapes[i])} "
                    "when the optimizer was built; re-sharding a model after building its optimizer is not supported"
                )

    def pending_grads(self) -> tuple[list[bool] | None, list[tuple[int, Tensor]]]:
        """Which parameters have a gradient, and their local gradient shards (checked, nothing modified)."""
        active, grads = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None or not p.requires_grad:
                active.append(False)
                continue
            if not is_dtensor(g) or tuple(g.placements) != tuple(p.placements):
                raise RuntimeError(
                    f"gradient of parameter {i} is {type(g).__name__}"
                    + (f" with placements {tuple(g.placements)}" if is_dtensor(g) else "")
                    + f"; the parameter is a DTensor with placements {tuple(p.placements)}"
                )
            local = g.to_local()
            if local.shape != self.shapes[i] or local.dtype != self.dtype:
                raise RuntimeError(
                    f"gradient of parameter {i} has local shape {tuple(local.shape)} and dtype {local.dtype}, "
                    f"expected {tuple(self.shapes[i])} and {self.dtype}"
                )
            active.append(True)
            grads.append((i, local))
        return (None if all(active) else active), grads

    def adopt_grads(self, foreign: list[tuple[int, Tensor]]) -> None:
        pass  # the gradients stay FSDP's; steps read them where they are

    def zero_grad(self, set_to_none: bool) -> None:
        """As ``torch.optim.Optimizer.zero_grad``: release the gradients, or zero those that exist."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def attach_grads(self) -> None:
        """``p.grad`` as DTensors over ``grad``'s slices (what ``meta_gradient()`` wrote)."""
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            p.grad = self.wrap_entry(i, view)

    # ------------------------------------------------------------------ state_dict entries

    def entry_shape(self, i: int) -> torch.Size:
        return self.params[i].shape

    def wrap_entry(self, i: int, local: Tensor) -> Tensor:
        p = self.params[i]
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

    def unwrap_entry(self, i: int, value: Tensor) -> Tensor:
        if not is_dtensor(value):
            raise ValueError(
                f"state_dict entry for FSDP2 parameter {i} is a plain tensor; a sharded optimizer loads DTensors "
                "(torch.distributed.checkpoint reshards them; get_optimizer_state_dict/set_optimizer_state_dict too)"
            )
        if tuple(value.placements) != tuple(self.params[i].placements):
            value = value.redistribute(self.params[i].device_mesh, self.params[i].placements)
        return value.to_local()


def step_local_shards(b: ShardedFlatBuffer, grads: list[tuple[int, Tensor]], step_fn) -> None:
    """One inner step of each local shard that has a gradient, in place (one backend call per
    shard), against its slices of the flat state buffers.  ``step_fn(i, param, grad, part)``
    makes the call; ``part`` is the shard's slice of the flat layout."""
    b.reshard_modules()
    shards = b.local_shards()
    for i, g in grads:
        n = b.numels[i]
        if n == 0:  # a rank may hold no rows of a small parameter; its step count still advances
            continue
        g = g if g.is_contiguous() else g.contiguous()
        step_fn(i, shards[i].view(-1), g.view(-1), slice(b.offsets[i], b.offsets[i] + n))


def fsdp_modules_of(params: list[Tensor]) -> list[weakref.ref] | None:
    """Weak references to the FSDP2 modules whose parameter groups hold ``params``;
    ``None`` when FSDP2's state cannot be read.

    FSDP2 keeps no public map from a parameter to its module, so this reads its private
    state once per buffer (guarded: torch 2.11 has one param group per module, later
    releases a list)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    ids = {id(p) for p in params}
    found = []
    try:
        for module in list(_module_state_mapping.keys()):
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                groups = [g for g in (state._fsdp_param_group,) if g is not None]
            if any(id(fp.sharded_param) in ids for g in groups for fp in g.fsdp_params):
                found.append(weakref.ref(module))
    except (AttributeError, AssertionError):
        return None
    return found


def agree_nonfinite(b: ShardedFlatBuffer, where: str | None) -> str | None:
    """This rank's finding about its shards, or another rank's of the same shard group."""
    flag = torch.tensor([0.0 if where is None else 1.0], device=b.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=b.mesh.get_group())
    if where is None and bool(flag.item()):
        return "in a shard that another rank of its FSDP2 shard group holds"
    return where


def check_not_mixed(trainable: list[Tensor]) -> None:
    """Refuse a param group that mixes FSDP2 (DTensor) parameters and plain tensors."""
    sharded = [is_dtensor(p) for p in trainable]
    if any(sharded) and not all(sharded):
        i = sharded.index(False)
        raise ValueError(
            f"parameter {i} of shape {tuple(trainable[i].shape)} is a plain tensor in a param group of FSDP2 "
            "(DTensor) parameters: FSDP would not reduce its gradient over the shard group, so the ranks would "
            "drift apart. Shard the whole model with fully_shard, or give the plain parameters an optimizer of "
            "their own"
        )


def flat_buffer(params: list[Tensor], memory_format=None) -> FlatBuffer:
    """The flat buffer for one param group's parameters of one dtype: FSDP2 parameters stay
    where FSDP keeps them, plain ones are packed."""
    return ShardedFlatBuffer(params, memory_format) if is_dtensor(params[0]) else FlatBuffer(params, memory_format)


def task_group_of(buffers: list[FlatBuffer]):
    """The ranks that hold the same shards as this one (the ``"tasks"`` dimension of a tasks
    × shards mesh), or ``None`` when no other rank does (1-D FSDP over all ranks).

    Derived from the parameters' mesh alone: every rank publishes its shard mesh's ranks;
    the ranks at this rank's position in every shard mesh form its task group.  All ranks
    take part (``dist.new_group`` is collective), whatever they hold.
    """
    meshes = {id(b.mesh): b.mesh for b in buffers if getattr(b, "sharded", False)}
    if len(meshes) > 1:
        raise ValueError("the optimizer's FSDP2 parameters are sharded over different meshes; pass process_group=")
    mine = [int(r) for r in next(iter(meshes.values())).mesh.flatten().tolist()] if meshes else []
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    shard_meshes = sorted({tuple(m) for m in everyone if m})
    size = len(shard_meshes[0]) if shard_meshes else 0
    covered = sorted(r for m in shard_meshes for r in m)
    if any(len(m) != size for m in shard_meshes) or covered != list(range(dist.get_world_size())):
        raise ValueError(
            f"the FSDP2 shard meshes {shard_meshes} do not split the world's {dist.get_world_size()} ranks into "
            "equal, disjoint groups; pass process_group= (the ranks that hold the same shards)"
        )
    if len(shard_meshes) == 1:
        return None
    groups = [dist.new_group([m[c] for m in shard_meshes]) for c in range(size)]
    rank = dist.get_rank()
    for c in range(size):
        if any(m[c] == rank for m in shard_meshes):
            return groups[c]
    raise AssertionError("unreachable: every rank is in one shard mesh")
