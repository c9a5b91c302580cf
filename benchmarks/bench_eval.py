"""Evaluation tasks per second: one task at a time against many at once (--eval-batch-tasks).

The evaluation protocol of ``reptile-fused eval`` (reptile_fused/app/evaluate.py) with
the paper's evaluation settings (the presets' --eval-batch / --eval-iters,
non-transductive: each query classified with the whole support set) on the
Omniglot-style and the Mini-ImageNet-style nets, on synthetic images (data loading
is not what is measured; the tasks are drawn the same way).  Modes:

  sequential   evaluate(..., batch_tasks=1): adapt, predict, restore, task after task
  batched_N    evaluate(..., batch_tasks=N): N tasks adapted at once under vmap, one
               fused optimizer step per inner step over all of them

Each round evaluates the same ``--tasks`` tasks in every mode (modes rotated every
round); the median over rounds is reported.  Also reports, per case, whether the
batched accuracy equals the sequential one over those tasks.

    python benchmarks/bench_eval.py                       # this machine, CPU
    python benchmarks/bench_eval.py --device cuda --batch-tasks 8 32 64

Writes benchmarks/results/eval_<device>.csv and .png (columns: benchmark, case,
provider, device, dtype, threads, median_s, tasks_per_s, machine, date); a GPU run
appends "not measured" rows for nothing.  ``eval --eval-samples 10000`` takes about
10000 / tasks_per_s seconds.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reptile_fused.app.config import PRESETS, TrainConfig  # noqa: E402
from reptile_fused.app.evaluate import evaluate  # noqa: E402
from reptile_fused.app.problems import ClassificationProblem  # noqa: E402
from reptile_fused.app.train import make_optimizer  # noqa: E402
from reptile_fused.data import ImageClasses  # noqa: E402
from reptile_fused.models import MiniImageNetNet, OmniglotNet  # noqa: E402

COLUMNS = ["benchmark", "case", "provider", "device", "dtype", "threads", "median_s", "tasks_per_s", "machine", "date"]
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
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/eval_<device>.csv)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    date = datetime.date.today().isoformat()
    out = Path(args.out or Path(__file__).parent / "results" / f"eval_{device.type}.csv")
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
        modes = [("sequential", 1)] + [(f"batched_{n}", n) for n in args.batch_tasks]
        times = {m: [] for m, _ in modes}
        accs = {}
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for mode, n in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                res = evaluate(net, opt, problem, "test", args.tasks, eval_batch, eval_iters, False,
                               torch.Generator().manual_seed(r), batch_tasks=n)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[mode].append(time.perf_counter() - t0)
                accs.setdefault(mode, []).append(res["acc"])
        for mode, _ in modes:
            med = statistics.median(times[mode])
            rows.append(dict(benchmark="eval", case=case, provider=mode, device=device.type, dtype="float32",
                             threads=args.threads, median_s=f"{med:.4f}", tasks_per_s=f"{args.tasks / med:.3f}",
                             machine=machine, date=date))
            same = "" if mode == "sequential" else f", accuracy equal to sequential in {sum(a == b for a, b in zip(accs[mode], accs['sequential']))}/{args.rounds} rounds"
            print(f"{case:60s} {mode:12s} {args.tasks / med:8.3f} tasks/s  "
                  f"(eval --eval-samples 10000: {10000 * med / args.tasks / 60:.0f} min){same}", flush=True)
    if device.type == "cpu":
        for name in args.cases:
            preset = PRESETS[CASES[name][0]].settings
            case = f"{name} 5-way {preset.get('shots', 5)}-shot (eval-batch {preset['eval_batch']}, eval-iters {preset['eval_iters']})"
            for mode in ["sequential"] + [f"batched_{n}" for n in args.batch_tasks]:
                rows.append(dict(benchmark="eval", case=case, provider=mode, device="cuda", dtype="float32",
                                 threads="", median_s="not measured", tasks_per_s="not measured (no GPU)",
                                 machine="", date=date))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"Wrote {out}")
    chart(rows, out.with_suffix(".png"))
    return 0


def chart(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    measured = [r for r in rows if r["median_s"] != "not measured"]
    cases = list(dict.fromkeys(r["case"] for r in measured))
    providers = list(dict.fromkeys(r["provider"] for r in measured))
    fig, ax = plt.subplots(figsize=(8, 3 + 0.5 * len(cases)))
    height = 0.8 / len(providers)
    for k, p in enumerate(providers):
        ys = [i + k * height for i in range(len(cases))]
        vals = [next((float(r["tasks_per_s"]) for r in measured if r["case"] == c and r["provider"] == p), 0) for c in cases]
        bars = ax.barh(ys, vals, height, label=p)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], [c.replace(" (", "\n(") for c in cases], fontsize=8)
    ax.set_xlabel("evaluation tasks per second (higher is better)")
    dev = measured[0]["device"] if measured else "?"
    ax.set_title(f"reptile-fused eval on {dev} ({measured[0]['machine'] if measured else ''}, "
                 f"{measured[0]['threads'] if measured else ''} thread(s))", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"Wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
