"""Reptile on an FSDP2-sharded transformer: tasks x shards on the CPU (gloo).

A small causal transformer (``torch.nn.TransformerEncoder``, random init, nothing
downloaded) reads a sequence of numbers x_1 ... x_T and predicts y_t at every position.
Each task is a rule y_t = sin(2 x_t) + a x_t + c with its own (a, c).  The periodic part
is shared by every task, and a random init does not fit it in a few steps; the task's
own (a, c) cannot be read off the inputs, so it is learnt only by adapting to the task's
support set (k steps of the inner optimizer).  Reptile meta-learns an initialisation
from which those k steps fit a new rule; the script reports the post-adaptation query
MSE on held-out tasks before and after meta-training (with the defaults: 0.39 from the
random init, 0.10 after 16 meta-iterations, in every layout up to float32 rounding; about
20 s with 2 ranks on 2 CPU cores).
The rule acts position by position: the point here is sharding the model, not attention.

Run it with ``torchrun`` (one process per rank, gloo on 127.0.0.1); world size 1 is the
unsharded model, without FSDP::

    python examples/fsdp_transformer.py                                   # world size 1, unsharded
    torchrun --nproc_per_node=2 examples/fsdp_transformer.py              # 1-D FSDP over both ranks
    torchrun --nproc_per_node=4 examples/fsdp_transformer.py --mesh 2,2   # 2 task groups x 2 shards

``--mesh T,S`` (T * S = world size) builds a DeviceMesh ("tasks", "shard") and shards the
model over "shard": the S ranks of a shard group run the same task, each on its S-th of
the rows (FSDP's reduce-scatter averages their gradients), and the meta-batch's tasks
are split over the T task groups; ``meta_step()`` all-reduces the task sums over the
ranks that hold the same shards.  The default (1,world) is 1-D FSDP: every rank runs
every task on its share of the rows, and the meta step communicates nothing.

Rank 0 prints one line per ``--log-every`` meta-iterations.  ``--report out.json`` writes
the measurements: meta-batch tasks per second (wall clock, the slowest rank's time per
meta-iteration, median over the iterations after the first, evaluations not timed),
the bytes each rank holds for parameters, gradients and the optimizer (from the tensors
themselves), the process's peak RSS, and the held-out losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from reptile_fused import ReptileOptimizer  # noqa: E402
from reptile_fused.distributed import shard  # noqa: E402

EVAL_SEED = 20180308  # the held-out tasks: one fixed set, never trained on


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mesh", default=None, help="T,S: task groups x shards (T*S = world size); default 1,WORLD")
    p.add_argument("--width", type=int, default=64, help="model width (d_model)")
    p.add_argument("--depth", type=int, default=2, help="transformer layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--meta-iters", type=int, default=16)
    p.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-iteration")
    p.add_argument("--inner-steps", type=int, default=5, help="inner steps per training task")
    p.add_argument("--eval-steps", type=int, default=10, help="inner steps per held-out task (evaluation)")
    p.add_argument("--rows", type=int, default=8, help="sequences per support set (split over a shard group)")
    p.add_argument("--inner-optimizer", choices=("sgd", "adam"), default="sgd",
                   help="sgd: plain SGD; adam: the authors' recipe, betas (0, 0.999), state reset per task")
    p.add_argument("--lr", type=float, default=0.02, help="inner step size (with adam, try 3e-3)")
    p.add_argument("--meta-lr", type=float, default=1.0, help="meta step size")
    p.add_argument("--meta-lr-final", type=float, default=1.0, help="meta step size at the end (linear schedule)")
    p.add_argument("--eval-tasks", type=int, default=4, help="held-out tasks per evaluation")
    p.add_argument("--log-every", type=int, default=8, help="evaluate and print every N meta-iterations")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation and training tasks")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--report", type=Path, default=None, help="write the measurements to this JSON file")
    args = p.parse_args(argv)
    for name in ("width", "depth", "heads", "seq_len", "meta_batch", "inner_steps", "eval_steps", "rows", "eval_tasks",
                 "log_every", "threads"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.meta_iters < 2:
        p.error(f"--meta-iters must be >= 2 (the first is a warm-up, not timed), got {args.meta_iters}")
    if args.width % args.heads:
        p.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    return args


# ---------------------------------------------------------------------- model and tasks


class TinyTransformer(nn.Module):
    """Numbers in, numbers out: a causal pre-norm transformer encoder over a scalar sequence."""

    def __init__(self, width: int, depth: int, heads: int, seq_len: int):
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.head = nn.Linear(width, 1)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, seq_len, 1) -> (rows * seq_len, 1)
        h = self.encoder(self.embed(x) + self.pos, mask=self.mask, is_causal=True)
        # Flattened: FSDP warns when a module returns a view, which a 3-D Linear output is.
        return self.head(h.reshape(-1, h.shape[-1]))


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y.reshape(-1, 1))


def sample_task(g: torch.Generator, rows: int, seq_len: int) -> tuple:
    """One rule (a, c) and a support and a query set of ``rows`` sequences each."""
    a, c = (2 * torch.rand(2, generator=g) - 1).tolist()

    def sequences():
        x = torch.randn(rows, seq_len, 1, generator=g)
        return x, torch.sin(2 * x) + a * x + c

    return sequences(), sequences()


def meta_batch_tasks(seed: int, iteration: int, args) -> list:
    """Iteration ``iteration``'s tasks, the same on every rank (each rank then takes its own)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return [sample_task(g, args.rows, args.seq_len) for _ in range(args.meta_batch)]


def eval_tasks(args) -> list:
    g = torch.Generator().manual_seed(EVAL_SEED)
    return [sample_task(g, args.rows, args.seq_len) for _ in range(args.eval_tasks)]


# ---------------------------------------------------------------------- the mesh


class Layout:
    """Where this rank sits: its task group (a row of the mesh) and its rows within a shard group."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        tasks, shards = (1, self.world) if args.mesh is None else _parse_mesh(args.mesh)
        if tasks * shards != self.world:
            raise SystemExit(f"--mesh {tasks},{shards} needs {tasks * shards} processes, the world size is {self.world}")
        if args.rows % shards:
            raise SystemExit(f"--rows {args.rows} does not split evenly over the {shards} ranks of a shard group")
        self.tasks, self.shards = tasks, shards
        self.shard_mesh = None
        self.task_rank, self.shard_rank = 0, 0
        if self.world > 1:
            from datetime import timedelta

            from torch.distributed.device_mesh import init_device_mesh

            dist.init_process_group("gloo", timeout=timedelta(seconds=120))
            if tasks == 1:
                self.shard_mesh = init_device_mesh("cpu", (shards,))
            else:
                mesh = init_device_mesh("cpu", (tasks, shards), mesh_dim_names=("tasks", "shard"))
                self.shard_mesh = mesh["shard"]
                self.task_rank = mesh["tasks"].get_local_rank()
            self.shard_rank = self.shard_mesh.get_local_rank()
        self.part = args.rows // shards

    @property
    def sharded(self) -> bool:
        return self.shard_mesh is not None

    def my_tasks(self, tasks: list) -> list:
        return shard(tasks, self.task_rank, self.tasks)

    def my_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.shard_rank * self.part : (self.shard_rank + 1) * self.part]

    def sum_over_world(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def max_over_world(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _parse_mesh(text: str) -> tuple[int, int]:
    try:
        tasks, shards = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--mesh takes two sizes T,S (task groups, shards), got {text!r}") from None
    if tasks < 1 or shards < 1:
        raise SystemExit(f"--mesh sizes must be >= 1, got {text!r}")
    return tasks, shards


def build_model(args, layout: Layout) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every world size
    model = TinyTransformer(args.width, args.depth, args.heads, args.seq_len)
    if layout.sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.layers:  # one all-gather per layer, as FSDP2 is meant to be used
            fully_shard(layer, mesh=layout.shard_mesh)
        fully_shard(model, mesh=layout.shard_mesh)
    return model


# ---------------------------------------------------------------------- training and evaluation


class _Discard(Exception):
    """Raised inside ``opt.task()`` to throw an evaluation task away (θ and the inner state restored)."""


def adapt(model, opt, support, layout: Layout, steps: int) -> None:
    x, y = (layout.my_rows(t) for t in support)
    for _ in range(steps):
        opt.zero_grad()
        mse(model, x, y).backward()  # FSDP averages the shard group's row shares
        opt.step()


def evaluate(model, opt, tasks: list, layout: Layout, steps: int) -> float:
    """Mean query MSE over ``tasks`` after ``steps`` inner steps from the current θ (θ unchanged)."""
    total = 0.0
    for support, query in layout.my_tasks(tasks):
        try:
            with opt.task():
                adapt(model, opt, support, layout, steps)
                with torch.no_grad():
                    qx, qy = (layout.my_rows(t) for t in query)
                    total += mse(model, qx, qy).item()
                # (This forward leaves FSDP's root module unsharded; the rollback below
                # reshards it before restoring θ, so the next forward gathers θ.)
                raise _Discard
        except _Discard:
            pass
    # Each task's loss is the mean of its S shard ranks' row means.
    return layout.sum_over_world([total])[0] / (len(tasks) * layout.shards)


def train(args, layout: Layout, log=print) -> dict:
    model = build_model(args, layout)
    # The authors' recipe: inner Adam with beta1 = 0, its state reset at each task.
    extra = dict(betas=(0.0, 0.999), reset_inner_state="task") if args.inner_optimizer == "adam" else {}
    opt = ReptileOptimizer(model.parameters(), inner_optimizer=args.inner_optimizer, lr=args.lr,
                           meta_lr=args.meta_lr, **extra)  # fmt: skip
    sched = torch.optim.lr_scheduler.LinearLR(opt.meta_optimizer, 1.0, args.meta_lr_final / args.meta_lr,
                                              total_iters=args.meta_iters)
    held_out = eval_tasks(args)
    losses = {0: evaluate(model, opt, held_out, layout, args.eval_steps)}
    log(f"iteration 0: held-out query MSE after {args.eval_steps} inner steps {losses[0]:.4f} (random init)")
    seconds = []
    for iteration in range(1, args.meta_iters + 1):
        start = time.perf_counter()
        for support, _ in layout.my_tasks(meta_batch_tasks(args.seed, iteration, args)):
            with opt.task():
                adapt(model, opt, support, layout, args.inner_steps)
        opt.meta_step()
        sched.step()
        seconds.append(time.perf_counter() - start)
        if iteration == args.meta_iters:
            memory = measure_bytes(model, opt, layout)
        if iteration % args.log_every == 0 or iteration == args.meta_iters:
            losses[iteration] = evaluate(model, opt, held_out, layout, args.eval_steps)
            log(f"iteration {iteration}: held-out query MSE after {args.eval_steps} inner steps "
                f"{losses[iteration]:.4f}, {args.meta_batch / seconds[-1]:.1f} tasks/s")  # fmt: skip
    timed = layout.max_over_world(seconds[1:])  # the first iteration is a warm-up
    median = statistics.median(timed)
    return dict(
        world_size=layout.world, mesh=[layout.tasks, layout.shards], sharded=layout.sharded,
        parameters=sum(p.numel() for p in model.parameters()),
        config={k: getattr(args, k) for k in ("width", "depth", "heads", "seq_len", "meta_iters", "meta_batch",
                                              "inner_steps", "eval_steps", "rows", "lr", "meta_lr", "meta_lr_final", "eval_tasks", "seed",
                                              "threads")},
        dtype="float32", inner_optimizer="adam", betas=[0.0, 0.999],
        iteration_seconds=timed, median_iteration_seconds=median, tasks_per_s=args.meta_batch / median,
        held_out_loss={str(k): v for k, v in losses.items()},
        loss_before_meta_training=losses[0], loss_after_meta_training=losses[args.meta_iters],
        bytes_per_rank=layout.gather(memory),
        max_rss_bytes_per_rank=layout.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    )  # fmt: skip


# ---------------------------------------------------------------------- memory, from the tensors


def measure_bytes(model: nn.Module, opt: ReptileOptimizer, layout: Layout) -> dict:
    """What this rank holds between meta-iterations, in bytes, counted from the tensors.

    ``parameters``: the local shards (FSDP's), or the unsharded flat buffer the parameters
    are views of; ``gradients``: FSDP's gradient shards, or the flat gradient buffer;
    ``optimizer``: everything else the optimizer allocated, itemised.  FSDP's transient
    all-gathered parameters (during forward and backward) are not counted here; the peak
    RSS in the report includes them.
    """

    def nbytes(t) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    parts = dict(parameters=0, gradients=0, mirror=0, meta_gradient=0, anchor=0, task_sum=0, fomaml_update=0,
                 inner_state=0)  # fmt: skip
    if layout.sharded:
        with torch.no_grad():
            parts["parameters"] = sum(nbytes(p.to_local()) for p in model.parameters())
            parts["gradients"] = sum(nbytes(p.grad.to_local()) for p in model.parameters() if p.grad is not None)
    # The anchor, the task sum and the inner state are not public attributes: read from the
    # optimizer's per-buffer state (FlatState), which is what the memory is.
    for f in opt._flats:
        b = f.buffer
        if layout.sharded:
            parts["mirror"] += nbytes(b.data)  # the flat copy of the shards the task-end and meta kernels use
            # where meta_gradient() writes θ − mean(θ̃), made on its first call (reading .grad would make it)
            parts["meta_gradient"] += nbytes(b._grad)
        else:
            parts["parameters"] += nbytes(b.data)
            parts["gradients"] += nbytes(b.grad)
        parts["anchor"] += nbytes(f.anchor)
        parts["task_sum"] += nbytes(f.acc_ext)
        parts["fomaml_update"] += nbytes(f.update)
        parts["inner_state"] += sum(nbytes(t) for t in f.state.values())
    parts["optimizer"] = sum(v for k, v in parts.items() if k not in ("parameters", "gradients"))
    parts["total"] = parts["parameters"] + parts["gradients"] + parts["optimizer"]
    return parts


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    layout = Layout(args)
    try:
        main_rank = layout.rank == 0

        def log(line: str) -> None:
            if main_rank:
                print(line, flush=True)

        log(f"world size {layout.world}: " + (f"{layout.tasks} task group(s) x {layout.shards} shard(s), FSDP2"
                                               if layout.sharded else "unsharded, no FSDP"))  # fmt: skip
        report = train(args, layout, log)
        log(f"done: {report['tasks_per_s']:.2f} tasks/s (median of {len(report['iteration_seconds'])} meta-iterations"
            f"), {report['bytes_per_rank'][0]['total'] / 2**20:.2f} MiB per rank (parameters, gradients, optimizer); "
            f"held-out MSE {report['loss_before_meta_training']:.4f} -> {report['loss_after_meta_training']:.4f}")
        if main_rank and args.report is not None:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=1) + "\n")
        if not all(math.isfinite(v) for v in report["held_out_loss"].values()):
            log("the held-out loss is not finite")
            return 1
        return 0
    finally:
        if dist.is_initialized():
            # Every rank finishes its collectives before any tears gloo down: a rank that leaves
            # first can abort its peer's gloo threads ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
