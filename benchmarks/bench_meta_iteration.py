"""Meta-iterations per second and peak memory of five ways to run Reptile.

One meta-iteration = n tasks × k inner SGD steps (inner batch B, `ways`-way
cross-entropy) + the meta update, on the Omniglot-style and the Mini-ImageNet-style
nets of the Reptile paper.  Modes:

  seed          the original sketch's loop (docs: /work/shared/reference/reptile-seed.md),
                extended to a meta-batch: per-parameter clones of θ, a new torch.optim.SGD
                per task, the per-parameter interpolation at the end
  l2l           a learn2learn-style loop: copy.deepcopy(model) per task, the meta-gradient
                θ - mean(θ̃ᵢ) accumulated into p.grad, an outer torch.optim.SGD(lr=ε)
  sequential    ReptileOptimizer (flat buffers, backend "auto")
  sequential_cl ReptileOptimizer(memory_format=torch.channels_last): the flat buffer lays
                the conv weights out channels-last, so every convolution of the task
                steps runs in oneDNN's/cuDNN's NHWC kernels
  batched       BatchedReptile, eager (vmap over the tasks, one fused step per inner step)
  batched_cl    BatchedReptile(memory_format=torch.channels_last)
  graph         BatchedReptile(capture=True): one CUDA-graph replay per meta-iteration
                (CUDA only, and only with a device-reading backend; else "not measured")
  seed_cl       (diagnostic) the seed loop on a model the user moved to channels-last
                (model.to(memory_format=torch.channels_last)): how much of the *_cl gain
                the layout alone gives, with no help from this library
  floor         (diagnostic, not Reptile) forward + backward of the n·k task steps alone:
                what any task-after-task loop costs at least; the gap to it is the
                overhead batching can remove

Timing: every mode sees the same pre-generated device data (no data loading is timed);
rounds run the modes round-robin so machine noise hits all of them alike, and the
median over rounds is reported.  Memory: each mode runs in a fresh process; on CUDA
the peak of torch.cuda.max_memory_allocated() above what the model and data take, on
the CPU the peak running sum, in time order, of the profiler's tensor allocation and
free events from the same point (tensors only: no allocator caching, no oneDNN scratch).
Before timing, one meta-iteration of every mode runs from the same θ and the CSV reports
its largest difference to the seed loop's θ and to the seed loop's θ in float64 (how far
float32 rounding alone moves the result).

    python benchmarks/bench_meta_iteration.py                      # both nets, this machine
    python benchmarks/bench_meta_iteration.py --quick              # reduced repeats (make gpu-check)
    python benchmarks/bench_meta_iteration.py --mini-size 42       # a smaller Mini-ImageNet image

Writes rows of the harness schema (benchmarks/harness.py) into --out (default
benchmarks/results/benchmarks.csv; rows of other runs stay) and the chart
meta_iteration_<device>.png beside it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import harness as h  # noqa: E402
import plot  # noqa: E402

from reptile_fused import ReptileOptimizer, available_backends  # noqa: E402
from reptile_fused.batched import BatchedReptile  # noqa: E402

from reptile_fused.models import MiniImageNetNet, OmniglotNet  # noqa: E402

MODES = ("seed", "l2l", "sequential", "sequential_cl", "batched", "batched_cl", "graph")
# For reading the others: the seed loop given the channels-last layout by hand, and the
# forward/backward work alone (not Reptile).
DIAGNOSTICS = ("seed_cl", "floor")


# ---------------------------------------------------------------- the five loops


class Seed:
    """The sketch's loop, per parameter, with a meta-batch of n tasks."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg

    def __call__(self, xs, ys):
        model, c = self.model, self.cfg
        original = {name: param.clone() for name, param in model.named_parameters()}
        adapted_sum = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
        for i in range(c.n):
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(original[name])
            inner_optimizer = torch.optim.SGD(model.parameters(), lr=c.inner_lr)
            for step in range(c.k):
                logits = model(xs[step, i])
                loss = F.cross_entropy(logits, ys[step, i])
                inner_optimizer.zero_grad()
                loss.backward()
                inner_optimizer.step()
            with torch.no_grad():
                for name, param in model.named_parameters():
                    adapted_sum[name] += param
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.data = original[name] + c.meta_lr * (adapted_sum[name] / c.n - original[name])


class L2LStyle:
    """Deep copy per task; the meta-gradient θ - mean(θ̃ᵢ) goes to p.grad for an outer SGD."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.outer = torch.optim.SGD(model.parameters(), lr=cfg.meta_lr)

    def __call__(self, xs, ys):
        model, c = self.model, self.cfg
        self.outer.zero_grad()
        for p in model.parameters():
            p.grad = p.detach().clone()
        for i in range(c.n):
            learner = copy.deepcopy(model)
            opt = torch.optim.SGD(learner.parameters(), lr=c.inner_lr)
            for step in range(c.k):
                opt.zero_grad()
                F.cross_entropy(learner(xs[step, i]), ys[step, i]).backward()
                opt.step()
            with torch.no_grad():
                for p, q in zip(model.parameters(), learner.parameters()):
                    p.grad.add_(q, alpha=-1.0 / c.n)
        self.outer.step()


class Floor:
    """Forward and backward of the n·k task steps only, no optimizer at all: a lower
    bound for the time of any loop that runs the tasks one after another."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg

    def __call__(self, xs, ys):
        model, c = self.model, self.cfg
        for i in range(c.n):
            for step in range(c.k):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(xs[step, i]), ys[step, i]).backward()


class Sequential:
    def __init__(self, model, cfg, memory_format=None):
        self.model, self.cfg = model, cfg
        self.opt = ReptileOptimizer(
            model.parameters(), lr=cfg.inner_lr, meta_lr=cfg.meta_lr, backend=cfg.backend, memory_format=memory_format
        )

    def __call__(self, xs, ys):
        model, opt, c = self.model, self.opt, self.cfg
        for i in range(c.n):
            with opt.task():
                for step in range(c.k):
                    opt.zero_grad()
                    F.cross_entropy(model(xs[step, i]), ys[step, i]).backward()
                    opt.step()
        opt.meta_step()


class Batched:
    def __init__(self, model, cfg, capture=False, memory_format=None):
        self.br = BatchedReptile(
            model, cfg.n, lr=cfg.inner_lr, meta_lr=cfg.meta_lr, backend=cfg.backend, capture=capture,
            memory_format=memory_format,
        )

    def __call__(self, xs, ys):
        self.br.meta_iteration(xs, ys)


def graph_unavailable(device: torch.device, backend: str) -> str | None:
    if device.type != "cuda":
        return "CUDA graphs need a GPU"
    names = available_backends(device)
    resolved = names[0] if backend == "auto" else backend
    if resolved not in ("cpp", "triton"):
        return f"backend {resolved!r} cannot be captured (needs cpp or triton on CUDA)"
    return None


def make_mode(mode, model, cfg):
    if mode == "seed":
        return Seed(model, cfg)
    if mode == "l2l":
        return L2LStyle(model, cfg)
    if mode == "seed_cl":
        return Seed(model.to(memory_format=torch.channels_last), cfg)
    if mode == "sequential":
        return Sequential(model, cfg)
    if mode == "sequential_cl":
        return Sequential(model, cfg, memory_format=torch.channels_last)
    if mode == "batched":
        return Batched(model, cfg)
    if mode == "batched_cl":
        return Batched(model, cfg, memory_format=torch.channels_last)
    if mode == "graph":
        return Batched(model, cfg, capture=True)
    if mode == "floor":
        return Floor(model, cfg)
    raise ValueError(mode)


# ---------------------------------------------------------------- setup


class Config(argparse.Namespace):
    pass


def build(net, cfg, device, seed=0):
    torch.manual_seed(seed)
    if net == "omniglot":
        model, shape = OmniglotNet(cfg.ways), (1, 28, 28)
    else:
        model, shape = MiniImageNetNet(cfg.ways, image_size=cfg.mini_size), (3, cfg.mini_size, cfg.mini_size)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(cfg.k, cfg.n, cfg.batch, *shape, generator=g).to(device)
    ys = torch.randint(0, cfg.ways, (cfg.k, cfg.n, cfg.batch), generator=g).to(device)
    return model.to(device), xs, ys, shape


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_agreement(net, cfg, device, modes):
    """One meta-iteration of each mode from the same θ (two for graph: its first call
    records): the largest parameter difference to the float32 seed loop and to the seed
    loop in float64, the yardstick for how far float32 rounding alone moves θ."""

    def theta_after(make_run, iterations, dtype=torch.float32):
        model, xs, ys, _ = build(net, cfg, device)
        model, xs = model.to(dtype), xs.to(dtype)
        run = make_run(model)
        for _ in range(iterations):
            run(xs, ys)
        sync(device)
        return torch.cat([p.detach().flatten() for p in model.parameters()]).double()

    iterations = {m: 2 if m == "graph" else 1 for m in modes if m != "floor"}
    seed = {
        (dtype, k): theta_after(lambda model: Seed(model, cfg), k, dtype)
        for dtype in (torch.float32, torch.float64)
        for k in set(iterations.values())
    }
    out = {}
    for mode, k in iterations.items():
        theta = theta_after(lambda model: make_mode(mode, model, cfg), k)
        out[mode] = tuple(float((theta - seed[dtype, k]).abs().max()) for dtype in (torch.float32, torch.float64))
    return out


def time_modes(net, cfg, device, modes):
    """Seconds per meta-iteration of each mode, one sample per round (harness.Timer:
    rounds interleave the modes, rotating their order)."""
    runs = {}
    for mode in modes:
        model, xs, ys, _ = build(net, cfg, device)
        runs[mode] = functools.partial(make_mode(mode, model, cfg), xs, ys)
    timer = h.Timer(device.type, cfg.rounds, sync=lambda: sync(device))
    return timer.samples(runs, calls=cfg.iters, warmup=cfg.warmup)


def measure_memory(net, mode, cfg, device) -> dict:
    """Run in a fresh process: the peak tensor memory one mode adds on top of model and data."""
    torch.set_num_threads(cfg.threads)
    model, xs, ys, _ = build(net, cfg, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run = make_mode(mode, model, cfg)
        for _ in range(3):
            run(xs, ys)
        sync(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - base) / 2**20, "kind": "cuda max_memory_allocated"}
    # The CPU allocator keeps no peak statistics; the profiler records every tensor
    # allocation and free, so their running sum in time order is exact for tensors.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run = make_mode(mode, model, cfg)
        for _ in range(2):
            run(xs, ys)
    changes = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None:
            changes.append((node.start_time_ns, size))
    current = peak = 0
    for _, nbytes in sorted(changes):
        current += nbytes
        peak = max(peak, current)
    return {"peak_mib": peak / 2**20, "kind": "cpu tensor memory (profiler allocation events)"}


def memory_in_subprocess(net, mode, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-of", mode, "--nets", net, "--device", args.device,
           "--n", str(args.n), "--k", str(args.k), "--batch", str(args.batch), "--ways", str(args.ways),
           "--mini-size", str(args.mini_size), "--threads", str(args.threads), "--backend", args.backend]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"peak_mib": float("nan"), "kind": f"failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nets", default="omniglot,miniimagenet")
    p.add_argument("--modes", default=",".join(MODES + DIAGNOSTICS))
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--mini-size", type=int, default=84)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--meta-lr", type=float, default=0.5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (median over them)")
    p.add_argument("--iters", type=int, default=None, help="meta-iterations per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    p.add_argument("--quick", action="store_true", help="reduced repeats")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None, help="CSV path (default results/benchmarks.csv; rows of other runs stay)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv, namespace=Config())
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    rounds_given = args.rounds
    if args.iters is None:
        args.iters = (5 if args.quick else 20) if cuda else 1
    if args.memory_of:
        print(json.dumps(measure_memory(args.nets, args.memory_of, args, device)))
        return

    modes = [m for m in args.modes.split(",") if m]
    graph_reason = graph_unavailable(device, args.backend) if "graph" in modes else None
    timed = [m for m in modes if not (m == "graph" and graph_reason)]
    backend = available_backends(device)[0] if args.backend == "auto" else args.backend
    rows = []
    for net in args.nets.split(","):
        if rounds_given is None:
            # The CPU is shared and noisy: many short rounds for the small net, fewer
            # for the one that takes seconds per meta-iteration.
            if cuda:
                args.rounds = 5 if args.quick else 15
            else:
                args.rounds = (3 if args.quick else 25) if net == "omniglot" else (3 if args.quick else 7)
        model, _, _, shape = build(net, args, device)
        common = dict(
            benchmark="meta_iteration", op="meta_iteration", device=device.type, dtype="float32",
            case=f"{net} {'x'.join(map(str, shape))}, n={args.n}, k={args.k}, B={args.batch}, ways={args.ways}",
            numel=sum(p.numel() for p in model.parameters()), tensors=len(list(model.parameters())),
        )
        agree = check_agreement(net, args, device, timed)
        times = time_modes(net, args, device, timed)
        net_rows = []
        for mode in modes:
            if mode not in times:
                net_rows.append(h.make_row(**common, provider=mode, note=f"{h.NOT_MEASURED}: {graph_reason}"))
                continue
            stats = h.summary(times[mode])
            mem = {"peak_mib": float("nan"), "kind": "not measured"} if args.no_memory else memory_in_subprocess(net, mode, args)
            diff = agree.get(mode, (None, None))
            net_rows.append(h.make_row(
                **common, provider=mode, **stats, metric="meta_it_per_s", value=1 / stats["median_s"],
                peak_mib=None if mem["peak_mib"] != mem["peak_mib"] else round(mem["peak_mib"], 1), max_abs_diff_vs_baseline=diff[0], max_abs_diff_vs_float64=diff[1],
                note=f"backend {backend}, {args.iters} meta-iteration(s) per round; memory: {mem['kind']}",
            ))  # fmt: skip
        h.add_ratios(net_rows, "seed")
        for r in net_rows:
            print(f"{net:13s} {r['provider']:13s} {r['value'] or '-':>10} it/s  x{r['ratio_vs_baseline'] or '-':>8}  "
                  f"peak {r['peak_mib'] or '-':>8} MiB  diff {r['max_abs_diff_vs_baseline'] or '-'}"
                  f" (float64 {r['max_abs_diff_vs_float64'] or '-'})  {r['note'] if not r['median_s'] else ''}",
                  flush=True)  # fmt: skip
        rows += net_rows
    out = h.write_csv(Path(args.out) if args.out else RESULTS / "benchmarks.csv", rows)
    png = plot.plot_meta_iteration(rows, out.parent / f"meta_iteration_{device.type}.png",
                                   f"Reptile meta-iterations/s on {h.machine_description(device.type)}, "
                                   f"{torch.get_num_threads()} thread(s); × = vs the seed loop")  # fmt: skip
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
