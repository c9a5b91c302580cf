"""Learning curves: ``RUN_DIR/curves.png`` during training, and several runs on one chart.

Both read ``RUN_DIR/metrics.csv`` (one row per evaluation: ``iteration``, ``meta_step``,
``loss``, one score column per evaluation split such as ``train_acc`` / ``test_acc``, or
``test_mse`` for sine waves, and ``wall_s``).  Each row's score is one task's, so the
raw points are drawn faint under a moving average over about 5 % of the rows.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from .metrics import FIXED_COLUMNS as _FIXED
from .metrics import METRICS_NAME, MetricsError, read_columns

CURVES_NAME = "curves.png"


class CurvesError(MetricsError):
    """A run folder without usable metrics (printed as one line by the command line)."""


def read_metrics(run_dir) -> dict[str, list[float]]:
    """``RUN_DIR/metrics.csv`` as columns of floats (``nan`` where the run logged one).
    A row that is not whole is refused in one line naming the file and the line."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_NAME if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise CurvesError(f"{path}: no metrics.csv (is {run_dir} a run folder of reptile-fused train?)")
    columns = read_columns(path)
    if not columns["iteration"]:
        raise CurvesError(f"{path}: no rows yet")
    return columns


def score_columns(columns: dict) -> list[str]:
    return [c for c in columns if c not in _FIXED]


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Trailing moving average (NaNs skipped); ``window`` defaults to ~5 % of the points."""
    window = window or max(1, len(values) // 20)
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        good = [a for a in acc if not math.isnan(a)]
        out.append(sum(good) / len(good) if good else math.nan)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    """Write atomically: a reader (or a crash) never sees half a PNG.  The file gets the
    usual permissions (0666 less the umask, like the run's other files)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out.with_name(f".{out.stem}.{uuid.uuid4().hex[:12]}{out.suffix}"))
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=out.suffix[1:] or "png")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _label(name: str) -> str:
    split, _, metric = name.rpartition("_")
    return f"{split} {'accuracy' if metric == 'acc' else metric.upper()}"


def plot_run(run_dir, out=None) -> Path:
    """``RUN_DIR/curves.png`` (or ``out``): training loss (top, meta step size on the right
    axis) and each evaluation split's score (bottom) against meta-iterations."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / CURVES_NAME
    m = read_metrics(run_dir)
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    it = m["iteration"]
    top.plot(it, m["loss"], color="#1f77b4", lw=1.2, label="training loss (mean over the inner steps)")
    top.set_ylabel("loss")
    if any(v > 0 for v in m["loss"] if not math.isnan(v)):
        top.set_yscale("log")
    step_ax = top.twinx()
    step_ax.plot(it, m["meta_step"], color="#7f7f7f", ls="--", lw=1, label="meta step size")
    step_ax.set_ylabel("meta step size", color="#555555")
    step_ax.set_ylim(bottom=0)
    lines = top.get_lines() + step_ax.get_lines()
    top.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    colors = ["#2ca02c", "#d62728", "#9467bd", "#ff7f0e"]
    for color, name in zip(colors, score_columns(m)):
        bottom.plot(it, m[name], color=color, alpha=0.2, lw=0.8)
        bottom.plot(it, smooth(m[name]), color=color, lw=1.6, label=f"{_label(name)} (moving average)")
    bottom.set_xlabel("meta-iteration")
    bottom.set_ylabel("score after adaptation (one task per evaluation)")
    if score_columns(m):
        bottom.legend(loc="best", fontsize=8)
    top.set_title(f"{run_dir.name}: learning curves")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    try:
        _save(fig, out)
    finally:
        plt.close(fig)
    return out


def plot_runs(run_dirs: list, out) -> Path:
    """Several runs' metrics on one chart: loss, and every score column, one colour per run."""
    out = Path(out)
    runs = [(Path(r), read_metrics(r)) for r in run_dirs]
    names = []
    for _, m in runs:
        names += [c for c in score_columns(m) if c not in names]
    labels = [r.name for r, _ in runs]
    if len(set(labels)) < len(labels):  # same folder names: tell them apart by their paths
        labels = [str(r) for r, _ in runs]
    plt = _pyplot()
    fig, axes = plt.subplots(1 + len(names), 1, figsize=(8, 3 + 2.6 * len(names)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ((_, m), label) in enumerate(zip(runs, labels)):
        color = cycle[k % len(cycle)]
        axes[0].plot(m["iteration"], m["loss"], color=color, lw=1.2, label=label)
        for ax, name in zip(axes[1:], names):
            if name in m:
                ax.plot(m["iteration"], m[name], color=color, alpha=0.15, lw=0.8)
                ax.plot(m["iteration"], smooth(m[name]), color=color, lw=1.6, label=label)
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    for ax, name in zip(axes[1:], names):
        ax.set_ylabel(_label(name))
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("meta-iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{len(runs)} run{'s' if len(runs) > 1 else ''} (scores: moving averages, raw points faint)")
    try:
        _save(fig, out)
    finally:
        plt.close(fig)
    return out
