"""``reptile-fused demo``: meta-learning visibly working on sine waves, in a couple of CPU minutes.

Meta-trains the 1-64-64-1 MLP with Reptile on random sine waves, then adapts to new
waves from 10 points with 32 SGD steps, starting once from the meta-learned weights
and once from the random weights the run started from.  Prints both post-adaptation
MSEs (averaged over many new waves) and draws a picture like the paper's Figure 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import resolve
from ..data import Task
from .evaluate import Restorer, evaluate
from ..models import build_model
from .train import Trainer, make_optimizer

DEFAULT_OUT = Path("runs/demo/sine_demo.png")
DEFAULT_ITERS = 10_000
PLOT_STEPS = (0, 1, 32)
# Test waves come from their own seed, so both inits are scored on the same waves
# whatever the training seed.
TEST_SEED = 12345


def figure_path(out) -> Path:
    """Where the figure goes: ``out``, with ``.png`` added when it has no extension
    (what matplotlib would do silently).  ``ValueError`` for an extension matplotlib
    cannot write."""
    out = Path(out)
    if not out.suffix:
        return out.with_name(out.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise ValueError(f"--out {out}: matplotlib cannot write {out.suffix} files; "
                         f"use .png (or one of {', '.join('.' + f for f in sorted(formats) if f != 'png')})")
    return out


def adaptation_snapshots(model, opt, problem, task: Task, xs: torch.Tensor, steps=PLOT_STEPS) -> dict[int, torch.Tensor]:
    """Predictions on ``xs`` after each number of full-batch steps in ``steps``; weights restored after."""
    restorer = Restorer(opt)
    out = {}
    try:
        model.train()
        for k in range(max(steps) + 1):
            if k in steps:
                with torch.no_grad():
                    out[k] = model(xs).squeeze(1).cpu()
            if k < max(steps):
                opt.zero_grad()
                problem.loss(model(task.support_x), task.support_y).backward()
                opt.step()
    finally:
        restorer.restore()
    return out


def plot(path: Path, task: Task, xs, curves: dict[str, dict[int, torch.Tensor]], mse: dict[str, tuple],
         iterations: int, test_tasks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {0: "#a0a0a0", 1: "#f28e2b", 32: "#1f77b4"}
    styles = {0: ":", 1: "--", 32: "-"}
    x = xs.squeeze(1).cpu().numpy()
    truth = task.query_y.squeeze(1).cpu().numpy()
    sx = task.support_x.squeeze(1).cpu().numpy()
    sy = task.support_y.squeeze(1).cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    titles = {"random": "Random initialisation", "meta": f"Reptile meta-learned initialisation ({iterations:,} iterations)"}
    ymax = max(5.5, float(abs(truth).max()) + 1.0)
    for ax, key in zip(axes, ("random", "meta")):
        ax.plot(x, truth, color="black", lw=2.2, label="true function", zorder=3)
        for k, pred in curves[key].items():
            ax.plot(x, pred.numpy(), color=colors.get(k), ls=styles.get(k, "-"), lw=2.0,
                    label=f"after {k} step{'' if k == 1 else 's'}", zorder=4)
        ax.scatter(sx, sy, s=48, color="#d62728", edgecolor="white", linewidth=0.8, zorder=5,
                   label=f"the {len(sx)} training points")
        m, ci = mse[key]
        ax.set_title(titles[key], fontsize=11, fontweight="bold")
        ax.text(0.02, 0.97, f"MSE after {max(curves[key])} steps, {test_tasks} new waves:\n{m:.3f} ± {ci:.3f} (95% CI)",
                transform=ax.transAxes, va="top", ha="left", fontsize=9.5,
                bbox=dict(boxstyle="round,pad=0.35", facecolor="white", edgecolor="#cccccc", alpha=0.9))
        ax.set_xlim(-5, 5)
        ax.set_ylim(-ymax, ymax)
        ax.axhline(0, color="#dddddd", lw=0.8, zorder=0)
        ax.grid(alpha=0.25)
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9.5, frameon=False)
    fig.suptitle("Fitting a new sine wave from 10 points with SGD", fontsize=12.5)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_demo(out=DEFAULT_OUT, iterations: int = DEFAULT_ITERS, seed: int = 0, device=None, backend: str = "auto",
             test_tasks: int = 200, progress: bool = True, log=print) -> dict:
    """Train, compare, draw; returns the numbers it printed."""
    try:  # fail before minutes of training, not after
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("the demo draws with matplotlib: pip install 'reptile-fused[demo]'") from exc
    figure_path(out)  # an extension matplotlib cannot write fails here too
    config = resolve({"dataset": "sine", "meta_iters": iterations, "seed": seed}, preset="sine")
    trainer = Trainer(config, device=device, backend=backend, progress=progress)
    log(f"Meta-training a 1-64-64-1 MLP on sine waves for {iterations:,} iterations "
        f"({config.inner_iters} SGD steps of {config.inner_batch} points per task) on {trainer.device} ...")
    t0 = time.perf_counter()
    meta_model = trainer.run()
    train_s = time.perf_counter() - t0

    random_model = build_model(trainer.spec).to(trainer.device)
    random_model.load_state_dict(trainer.initial_state)
    random_opt = make_optimizer(random_model, config, backend)
    problem = trainer.problem
    models = {"meta": (meta_model, trainer.opt), "random": (random_model, random_opt)}

    mse = {}
    for key, (model, opt) in models.items():
        g = torch.Generator().manual_seed(TEST_SEED)
        r = evaluate(model, opt, problem, "test", test_tasks, config.eval_batch, config.eval_iters, True, g)
        mse[key] = (r["mse"], r["ci95"] or 0.0)

    task = problem.eval_task("test", torch.Generator().manual_seed(TEST_SEED + 1))
    xs = task.query_x
    curves = {key: adaptation_snapshots(model, opt, problem, task, xs) for key, (model, opt) in models.items()}
    # The numbers first: should the figure fail to be written, they are not lost.
    log(f"Meta-training took {train_s:.1f} s.")
    log(f"Post-adaptation MSE on {test_tasks} new sine waves (10 points, {config.eval_iters} SGD steps, "
        f"lr {config.learning_rate}), mean ± 95% CI:")
    log(f"  meta-learned init: {mse['meta'][0]:.4f} ± {mse['meta'][1]:.4f}")
    log(f"  random init:       {mse['random'][0]:.4f} ± {mse['random'][1]:.4f}")
    out = figure_path(out)
    plot(out, task, xs, curves, mse, iterations, test_tasks)
    log(f"Figure written to {out}")
    return {"mse_meta": mse["meta"][0], "mse_random": mse["random"][0], "ci95_meta": mse["meta"][1],
            "ci95_random": mse["random"][1], "train_seconds": train_s, "out": str(out)}
