"""Which inner-loop gradients should the meta step follow?  The Reptile paper's study.

Nichol et al. (2018) compare meta steps along different combinations of the inner
mini-batch gradients g1, g2, ... (SGD inner loop, each step on its own mini-batch):
Reptile over k steps moves along g1 + ... + gk, the same with the meta step divided
by k along their average, and first-order MAML (``--foml``) along gk alone.  The ten
runs are the ``gradcomb-*`` presets (their README's commands); this script trains
each with the app's :class:`~reptile_fused.app.train.Trainer` and draws the score
against meta-iterations, one line per combination:

* ``--dataset sine`` (default): the same ten combinations on sine-wave regression,
  small enough for a laptop CPU (see ``sine_config``), post-adaptation MSE;
* ``--dataset omniglot --data-root DIR``: the presets themselves (40,000 iterations
  each unless ``--meta-iters``), accuracy on the train and test characters.

Every evaluation scores the same ``--eval-tasks`` tasks per split (drawn once from a
fixed seed, the same for every run), adapted with the run's evaluation protocol, so
two points differ only by the weights.  Each combination runs ``--seeds`` times
(seed = weight initialisation and training tasks); the chart draws the mean over
seeds with a band of +-1 standard error.

Writes ``OUT_DIR/gradient_combinations_<dataset>.csv`` (long format: one row per
dataset, combination, seed, iteration and metric; ``iteration`` counts the meta steps
taken, 0 is the initialisation) and ``.png`` beside it.

    python examples/gradient_combinations.py                       # sine, all ten, 3 seeds
    python examples/gradient_combinations.py --combinations g1 g2 g1-g2 --seeds 1
    python examples/gradient_combinations.py --dataset omniglot --data-root data/omniglot --device cuda
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from reptile_fused.app.config import GRADCOMB, TrainConfig, gradcomb_label, resolve  # noqa: E402
from reptile_fused.app.evaluate import evaluate  # noqa: E402
from reptile_fused.app.train import Trainer  # noqa: E402

COMBINATIONS = list(GRADCOMB)  # g1, g1-g2, half-g1-g2, g2, ...
CSV_COLUMNS = ["dataset", "combination", "label", "algorithm", "inner_iters", "meta_step", "seed", "iteration",
               "metric", "value"]
EVAL_TASK_SEED = 20180308  # the evaluation tasks: one fixed set for every run and every evaluation

# Sine waves in the spirit of the study: SGD inner loop, k = 1..4 steps on disjoint
# mini-batches of 10 points (10 k points per training task), the presets' meta steps
# (0.25, or 0.25 / k), annealed linearly to 0 as their --meta-step-final 0; evaluation
# adapts on 10 points with 5 full-batch SGD steps (their study evaluates with 5 steps).
SINE_BATCH = 10
SINE = dict(classes=1, shots=10, inner_batch=SINE_BATCH, learning_rate=0.02, meta_step_final=0.0, meta_batch=1,
            eval_batch=10, eval_iters=5, inner_optimizer="sgd")
DEFAULTS = {  # dataset: (meta_iters, eval_every, eval_tasks, seeds)
    "sine": (2000, 100, 100, 3),
    "omniglot": (None, 1000, 100, 1),  # None: the presets' 40,000
}


def sine_config(name: str, seed: int, meta_iters: int) -> TrainConfig:
    _, k, _, step, foml = GRADCOMB[name]
    config = TrainConfig(dataset="sine", **SINE, train_shots=SINE_BATCH * k, inner_iters=k, meta_step=step,
                         foml=foml, seed=seed, meta_iters=meta_iters, eval_interval=meta_iters)
    config.validate()
    return config


def omniglot_config(name: str, seed: int, meta_iters: int | None, data_root: str) -> TrainConfig:
    explicit = {"data_root": data_root, "seed": seed, "meta_iters": meta_iters}
    return resolve(explicit, f"gradcomb-{name}")


class StudyTrainer(Trainer):
    """A Trainer that also scores the same ``eval_tasks`` tasks per split every
    ``eval_every`` meta steps (in :meth:`_iteration_done`, after the step; the
    evaluation tasks come from their own fixed generator, so the training draws do
    not change) and collects ``points``: ``(steps taken, {metric: score})``."""

    eval_tasks = 100
    study_batch_tasks = 1
    eval_every = 100

    def study_eval(self) -> dict[str, float]:
        c = self.config
        metric = self.problem.metric
        return {f"{split}_{metric}": evaluate(self.model, self.opt, self.problem, split, self.eval_tasks,
                                              c.eval_batch, c.eval_iters, c.transductive,
                                              torch.Generator().manual_seed(EVAL_TASK_SEED + i),
                                              batch_tasks=self.study_batch_tasks)[metric]
                for i, split in enumerate(self.problem.eval_splits)}

    def _iteration_done(self) -> None:
        if self.iteration % self.eval_every == 0 or self.iteration == self.config.meta_iters:
            self.points.append((self.iteration, self.study_eval()))


def run_one(job: dict) -> tuple[list[dict], float]:
    """Train one combination with one seed; its CSV rows and wall time."""
    torch.set_num_threads(job["threads"])
    name, seed = job["combination"], job["seed"]
    if job["dataset"] == "sine":
        config = sine_config(name, seed, job["meta_iters"])
    else:
        config = omniglot_config(name, seed, job["meta_iters"], job["data_root"])
    # The Trainer's own evaluation (one task per split, into metrics.csv) only at the first iteration.
    config.eval_interval = config.meta_iters
    config.checkpoint_interval = config.meta_iters  # one checkpoint, at the end
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(job["runs_dir"]) / f"{name}-seed{seed}" if job["runs_dir"] else Path(tmp) / "run"
        trainer = StudyTrainer(config, device=job["device"], backend=job["backend"], run_dir=run_dir,
                               progress=False, curves=False)
        trainer.eval_tasks = job["eval_tasks"]
        trainer.study_batch_tasks = job["eval_batch_tasks"]
        trainer.eval_every = job["eval_every"]
        start = time.perf_counter()
        trainer.points = [(0, trainer.study_eval())]  # the initialisation
        trainer.run()
        wall = time.perf_counter() - start
    _, k, _, step, foml = GRADCOMB[name]
    return [{"dataset": job["dataset"], "combination": name, "label": gradcomb_label(name),
             "algorithm": "fomaml" if foml else "reptile", "inner_iters": k, "meta_step": step, "seed": seed,
             "iteration": steps, "metric": metric, "value": value}
            for steps, scores in trainer.points for metric, value in scores.items()], wall


# ---------------------------------------------------------------------- the chart

COLOURS = {1: "black", 2: "tab:blue", 3: "tab:orange", 4: "tab:green"}  # by inner steps k


def line_style(combination: str) -> str:
    """FOMAML dashed; Reptile solid at the full meta step, dotted with the step divided by k."""
    _, k, _, step, foml = GRADCOMB[combination]
    if foml:
        return "--"
    return "-" if step == 0.25 else ":"


def plot(rows: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("test_mse", "test_acc", "train_acc") if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in [c for c in COMBINATIONS if any(r["combination"] == c for r in rows)]:
            by_iter: dict[int, list[float]] = {}
            for r in rows:
                if r["combination"] == name and r["metric"] == metric:
                    by_iter.setdefault(int(r["iteration"]), []).append(float(r["value"]))
            its = sorted(by_iter)
            mean = [sum(by_iter[i]) / len(by_iter[i]) for i in its]
            _, k, _, _, foml = GRADCOMB[name]
            ax.plot(its, mean, line_style(name), color=COLOURS[k], lw=1.6,
                    label=f"{gradcomb_label(name)} ({'FOMAML' if foml else 'Reptile'})")
            if all(len(by_iter[i]) > 1 for i in its):
                se = [_std(by_iter[i]) / math.sqrt(len(by_iter[i])) for i in its]
                ax.fill_between(its, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                                color=COLOURS[k], alpha=0.08, lw=0)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel({"test_mse": "post-adaptation MSE (new waves)", "test_acc": "test accuracy",
                       "train_acc": "train accuracy"}[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=["sine", "omniglot"], default="sine")
    p.add_argument("--data-root", default=None, help="Omniglot folder (required with --dataset omniglot)")
    p.add_argument("--combinations", nargs="+", choices=COMBINATIONS, default=COMBINATIONS, metavar="NAME",
                   help=f"which of {', '.join(COMBINATIONS)} (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="runs per combination, seeds 0..N-1 (sine 3, omniglot 1)")
    p.add_argument("--meta-iters", type=int, default=None, help="meta-iterations per run (sine 2000, omniglot 40000)")
    p.add_argument("--eval-every", type=int, default=None, help="iterations between evaluations (sine 100, omniglot 1000)")
    p.add_argument("--eval-tasks", type=int, default=None, help="tasks per split at each evaluation (default 100)")
    p.add_argument("--eval-batch-tasks", type=int, default=None, metavar="N",
                   help="evaluation tasks adapted at once under vmap (the app's --eval-batch-tasks: the same tasks, "
                        "scores equal up to float32 rounding; default: all of them for sine, the app's default "
                        "for omniglot)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where the CSV and PNG go")
    p.add_argument("--runs-dir", default=None, help="keep each run's folder (checkpoint.pt, metrics.csv) here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpp", "triton"])
    p.add_argument("--replot", action="store_true",
                   help="only redraw the PNG from the CSV a previous run wrote into --out-dir")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    args = p.parse_args(argv)
    if args.dataset == "omniglot" and not args.data_root:
        p.error("--dataset omniglot needs --data-root")
    meta_iters, eval_every, eval_tasks, seeds = DEFAULTS[args.dataset]
    args.meta_iters = args.meta_iters or meta_iters
    args.eval_every = args.eval_every or eval_every
    args.eval_tasks = args.eval_tasks or eval_tasks
    args.seeds = args.seeds or seeds
    if args.eval_batch_tasks is None:
        from reptile_fused.app.evaluate import default_eval_batch_tasks

        args.eval_batch_tasks = (args.eval_tasks if args.dataset == "sine"
                                 else default_eval_batch_tasks(torch.device(args.device)))
    for flag in ("seeds", "eval_every", "eval_tasks", "eval_batch_tasks", "jobs", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def title(args, seeds: int, meta_iters: int, eval_tasks: int) -> str:
    what = (f"sine waves: SGD inner loop, k steps on disjoint batches of {SINE_BATCH} points;\n"
            f"evaluation: {SINE['eval_iters']} SGD steps on {SINE['shots']} points of a new wave"
            if args.dataset == "sine" else f"Omniglot ({args.data_root}), the gradcomb-* presets")
    return (f"Inner-loop gradient combinations, {what}\n{meta_iters:,} meta-iterations; mean over "
            f"{seeds} seed{'s' * (seeds > 1)} x {eval_tasks} fixed evaluation tasks"
            + (" (band: +-1 s.e. over seeds)" if seeds > 1 else ""))


def replot(args) -> int:
    out_dir = Path(args.out_dir)
    csv_path = out_dir / f"gradient_combinations_{args.dataset}.csv"
    rows = _read(csv_path)
    seeds = len({r["seed"] for r in rows})
    meta_iters = max(int(r["iteration"]) for r in rows)
    png = plot(rows, out_dir / f"gradient_combinations_{args.dataset}.png", title(args, seeds, meta_iters, args.eval_tasks))
    print(f"Wrote {png} from {csv_path}")
    return 0


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    jobs = [{"dataset": args.dataset, "data_root": args.data_root, "combination": name, "seed": seed,
             "meta_iters": args.meta_iters, "eval_every": args.eval_every, "eval_tasks": args.eval_tasks,
             "eval_batch_tasks": args.eval_batch_tasks, "device": args.device, "backend": args.backend, "threads": args.threads, "runs_dir": args.runs_dir}
            for name in args.combinations for seed in range(args.seeds)]
    start = time.perf_counter()
    rows: list[dict] = []
    if args.jobs == 1:
        results = map(run_one, jobs)
    else:
        pool = ProcessPoolExecutor(args.jobs)
        results = pool.map(run_one, jobs)
    for job, (job_rows, wall) in zip(jobs, results):
        rows += job_rows
        print(f"{job['combination']:>20s} seed {job['seed']}: {wall:6.1f} s", flush=True)
    if args.jobs > 1:
        pool.shutdown()
    total = time.perf_counter() - start
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"gradient_combinations_{args.dataset}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (COMBINATIONS.index(r["combination"]), r["seed"], r["metric"],
                                                     r["iteration"])))
    png = plot(rows, out_dir / f"gradient_combinations_{args.dataset}.png",
               title(args, args.seeds, args.meta_iters, args.eval_tasks))
    print(f"Wrote {csv_path} and {png} ({len(jobs)} runs, {total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
