"""Evaluation tasks per second: one task at a time against many at once (--eval-batch-tasks).

The evaluation protocol of ``reptile-fused eval`` (reptile_fused/app/evaluate.py) with
the paper's evaluation settings (the presets' --eval-batch / --eval-iters,
non-transductive: each query classified with the whole support set) on the
Omniglot-style and the Mini-ImageNet-style nets, on synthetic images (data loading
is not what is measured; the tasks are drawn the same way).  Modes:

  sequential   evaluate(..., batch_tasks=1): adapt, predict, restore, task after task
  batched_N    evaluate(..., batch_tasks=N): N tasks adapted at once under vmap, one
               fused optimizer step per inner step over all of them
  batched_N_graph  the same adaptation recorded once as a CUDA graph and replayed
               (--cuda-graph, CUDA only: eval --eval-cuda-graph)

Each round evaluates the same ``--tasks`` tasks in every mode (modes rotated every
round); the median over rounds is reported.  Also reports, per case, whether the
batched accuracy equals the sequential one over those tasks.

    python benchmarks/bench_eval.py                       # this machine, CPU
    python benchmarks/bench_eval.py --device cuda --batch-tasks 8 32 64 --cuda-graph

Rows of the harness schema (``benchmark=eval``; ``median_s`` is seconds per evaluation
task, ``value`` tasks per second, the ratio against ``sequential`` from the same
rounds) go into benchmarks/results/benchmarks.csv, the chart into
eval_<device>.png.  ``eval --eval-samples 10000`` takes about 10000 · median_s seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reptile_fused.app.config import PRESETS, TrainConfig  # noqa: E402
from reptile_fused.app.evaluate import EvalBatching, evaluate  # noqa: E402
from reptile_fused.app.problems import ClassificationProblem  # noqa: E402
from reptile_fused.app.train import make_optimizer  # noqa: E402
from reptile_fused.data import ImageClasses  # noqa: E402
from reptile_fused.models import MiniImageNetNet, OmniglotNet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from plot import plot_eval  # noqa: E402

CASES = {
    # name: (preset, net, image shape)
    "omniglot": ("omniglot-5way-1shot", lambda: OmniglotNet(5), (1, 28, 28)),
    "miniimagenet": ("miniimagenet-5way-1shot", lambda: MiniImageNetNet(5), (3, 84, 84)),
}


def problem_for(shape, shots, device, classes=20, per_class=None):
    per_class = per_class or shots + 1
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, *shape), dtype=torch.uint8, generator=g)
    data = ImageClasses(images, torch.arange(classes + 1) * per_class, [f"c{i}" for i in range(classes)])
    return ClassificationProblem({"test": data}, 5, shots, shots, device, train_split=None, eval_splits=["test"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch-tasks", nargs="+", type=int, default=[8])
    ap.add_argument("--tasks", type=int, default=8, help="tasks per round (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cuda-graph", action="store_true", help="also batched_N_graph modes (CUDA only)")
    ap.add_argument("--out", default=str(harness.RESULTS), help="results folder (benchmarks.csv, eval_<device>.png)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        ap.error("--cuda-graph needs --device cuda")
    rows = []
    for name in args.cases:
        preset_name, make, shape = CASES[name]
        preset = PRESETS[preset_name].settings
        shots, eval_batch, eval_iters = preset.get("shots", 5), preset["eval_batch"], preset["eval_iters"]
        torch.manual_seed(0)
        net = make().to(device)
        opt = make_optimizer(net, TrainConfig(dataset="omniglot", data_root="x", learning_rate=preset["learning_rate"]))
        problem = problem_for(shape, shots, device)
        case = f"{name} 5-way {shots}-shot (eval-batch {eval_batch}, eval-iters {eval_iters})"
        modes = {"sequential": (1, False), **{f"batched_{n}": (n, False) for n in args.batch_tasks}}
        if args.cuda_graph:
            modes.update({f"batched_{n}_graph": (n, True) for n in args.batch_tasks if n > 1})
        accs: dict[str, list[float]] = {m: [] for m in modes}
        # One per mode for all rounds, as one `eval` run keeps one: a graph is recorded
        # at the first round (the warm-up below) and replayed in the timed ones.
        batchings = {m: EvalBatching(net, opt, problem, *modes[m]) for m in modes}
        rounds = iter(range(10**9))

        def run(mode: str):
            r = next(rounds)
            res = evaluate(net, opt, problem, "test", args.tasks, eval_batch, eval_iters, False,
                           torch.Generator().manual_seed(r // len(modes)), batch_tasks=modes[mode][0],
                           cuda_graph=modes[mode][1], batching=batchings[mode])  # fmt: skip
            accs[mode].append(res["acc"])

        timer = harness.Timer(str(device), rounds=args.rounds)
        samples = timer.samples({m: (lambda m=m: run(m)) for m in modes}, calls=1, warmup=1 if args.cuda_graph else 0)
        for mode, seconds in samples.items():
            stats = harness.summary([t / args.tasks for t in seconds])  # seconds per evaluation task
            same = sum(a == b for a, b in zip(accs[mode], accs["sequential"]))
            rows.append(harness.make_row(
                benchmark="eval", op="evaluate", case=case, provider=mode, device=device.type, dtype="float32",
                threads=args.threads, metric="tasks_per_s", value=1 / stats["median_s"], **stats,
                note="" if mode == "sequential" else f"accuracy equal to sequential in {same}/{len(accs[mode])} rounds",
            ))  # fmt: skip
            print(f"{case:60s} {mode:12s} {1 / stats['median_s']:8.3f} tasks/s  "
                  f"(eval --eval-samples 10000: {10000 * stats['median_s'] / 60:.0f} min)", flush=True)
        if device.type == "cpu":
            for mode in modes:
                rows.append(harness.make_row(benchmark="eval", op="evaluate", case=case, provider=mode, device="cuda",
                                             dtype="float32", threads="", machine="",
                                             note=f"{harness.NOT_MEASURED}: no GPU was available"))  # fmt: skip
    harness.add_ratios(rows, "sequential", keys=("benchmark", "op", "case", "device", "dtype"))
    out = Path(args.out)
    path = harness.write_csv(out / "benchmarks.csv", rows)
    print(f"Wrote {path}")
    measured = [r for r in rows if r["median_s"] not in ("", None)]
    if measured:
        print(f"Wrote {plot_eval(measured, out / f'eval_{device.type}.png', 'reptile-fused eval: ' + measured[0]['machine'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
