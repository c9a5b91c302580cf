"""Distributed meta-batches on ``torch.distributed``: each rank adapts its own tasks and
the meta step all-reduces the task accumulators, one collective per flat buffer.

Scaling model: a meta step moves one all-reduce of P (+1) elements per flat buffer,
whatever the number of inner steps or tasks per rank; the inner loops need no
communication at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

# Buffers larger than this many elements are all-reduced in slices, so one collective
# never needs a huge contiguous staging area in the communication library.
DEFAULT_BUCKET_ELEMENTS = 1 << 26


class LayoutMismatchError(RuntimeError):
    """The ranks of a distributed ReptileOptimizer do not hold the same parameter layout."""


def _is_device_mesh(obj) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch built without distributed support: no mesh can exist
        return False
    return isinstance(obj, DeviceMesh)


def resolve_process_group(process_group):
    """The group to synchronise over: ``None`` means the world group when
    ``torch.distributed`` is initialised (else no synchronisation); ``False`` opts out; a
    1-D ``DeviceMesh`` (a mesh dimension such as ``mesh["tasks"]``) means its group.
    (For FSDP2 parameters the optimizer replaces ``None`` by the task group, see
    :func:`reptile_fused.sharded.task_group_of`.)"""
    if process_group is False:
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a process_group was given but torch.distributed is not initialised")
    if _is_device_mesh(process_group):  # a mesh dimension, e.g. mesh["tasks"]
        if process_group.ndim != 1:
            raise ValueError(f"process_group as a DeviceMesh must be 1-D (one mesh dimension), got {process_group.ndim}-D")
        return process_group.get_group()
    return process_group


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's contiguous share of ``items``; the first ``len % world`` ranks get one more.

    Sharding ``range(n)`` this way and concatenating the shards in rank order gives back
    ``range(n)``, so a distributed meta-batch holds exactly the single-process tasks.
    """
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


def rank_generator(seed: int, rank: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator that differs per rank and is reproducible from one seed."""
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    digest = hashlib.sha256(f"reptile-fused:{seed}:{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def is_main_process() -> bool:
    """True on rank 0, or when not running distributed (use it to gate logging and checkpoints)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_from_environment(device_type: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns ``True`` when running distributed (``WORLD_SIZE`` > 1): NCCL for CUDA
    devices, gloo otherwise.  A no-op (``False``) for a plain single-process run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def layout_fingerprint(description: Sequence) -> Tensor:
    """A fixed-size int64 tensor summarising a layout description (shapes, dtypes, options)."""
    digest = hashlib.sha256(repr(list(description)).encode()).digest()
    words = [int.from_bytes(digest[i : i + 7], "little") for i in range(0, 28, 7)]
    return torch.tensor(words, dtype=torch.int64)


def layout_of(flats: list) -> list:
    """What must match across ranks for one all-reduce per flat buffer (``FlatState``s) to
    add like to like: group, dtype, shapes, and the element order inside each parameter's
    slice (its strides)."""
    return [(f.group_index, str(f.buffer.dtype), [tuple(s) for s in f.buffer.shapes], f.buffer.strides) for f in flats]


class MetaBatchSync:
    """The collectives a distributed ReptileOptimizer needs, on one process group."""

    def __init__(self, group, bucket_elements: int = DEFAULT_BUCKET_ELEMENTS):
        if bucket_elements < 1:
            raise ValueError(f"bucket_elements must be >= 1, got {bucket_elements}")
        self.group = group
        self.bucket_elements = bucket_elements
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )

    def join(self, flats: list, head: list, all_flats: list | None = None) -> None:
        """New flat buffers (``FlatState``s) on every rank: the layout of ``all_flats``
        (default ``flats``) with ``head`` (the optimizer's settings) must match across
        ranks for one all-reduce per buffer to add like to like, the element order inside
        each parameter's slice included; then every rank starts from rank 0's values."""
        self.check_same_layout(list(head) + layout_of(all_flats if all_flats is not None else flats))
        with torch.no_grad():
            for f in flats:
                f.buffer.pull()
                self.broadcast_(f.buffer.data)
                f.buffer.push()

    def check_same_layout(self, description: Sequence) -> None:
        """Raise :class:`LayoutMismatchError` on every rank unless all ranks describe the same layout.

        One all-gather of a fixed-size fingerprint: it cannot hang on a mismatch, and every
        rank sees every fingerprint, so every rank raises."""
        mine = layout_fingerprint(description).to(self.comm_device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        differing = [r for r, fp in enumerate(gathered) if not torch.equal(fp, gathered[0])]
        if differing:
            raise LayoutMismatchError(
                f"rank {self.rank}: the parameter layout (shapes, memory formats, dtypes, order, param groups, inner optimizer) "
                f"differs between ranks: ranks {differing} differ from rank 0. Build the same model and "
                "optimizer on every rank."
            )

    def broadcast_(self, t: Tensor, src: int = 0) -> None:
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not dist.group.WORLD else src,
                       group=self.group)

    def all_reduce_sum_(self, buf: Tensor) -> None:
        """Sum ``buf`` over the ranks in place, in slices of at most ``bucket_elements``."""
        n = buf.numel()
        for start in range(0, n, self.bucket_elements):
            dist.all_reduce(buf[start : start + self.bucket_elements], op=dist.ReduceOp.SUM, group=self.group)
