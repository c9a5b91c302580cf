"""The one plotting module: charts from rows of the harness schema (benchmarks/harness.py).

``panels`` draws one panel per group of rows: lines over ``numel`` when the group has
several sizes, bars per series otherwise.  ``plot_ops``, ``plot_meta_iteration`` and
``plot_distributed`` pick the groups, series and y column for each benchmark.
"""

from __future__ import annotations

import math
from pathlib import Path


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# One colour per provider in every chart.
COLOURS = {"reference": "C0", "cpp": "C1", "triton": "C6", "torch": "C2", "torch-fused": "C2", "torch-foreach": "C3",
           "torch-forloop": "C4", "seed loop": "C5", "cpp-fused": "C9", "ReptileOptimizer cpp fused=True": "C9",
           "ReptileOptimizer cpp": "C1"}  # fmt: skip


def _label(key: tuple, names: tuple) -> str:
    parts = []
    for name, v in zip(names, key):
        if v in ("", None):
            continue
        parts.append(f"{v} tensors" if name == "tensors" else str(v))
    return ", ".join(parts)


def panels(rows, path, group_by, y, ylabel, title, series="provider", roofline=False, scale=1.0,
           annotate=None, ncols=4, logy=False) -> Path:  # fmt: skip
    """Save a PNG of ``rows`` (those with a numeric ``y``) to ``path``.

    group_by: columns whose values make a panel; series: the column that makes a line or
    bar; scale: multiplies y; roofline: draw each group's roofline_gbps (dashed);
    annotate(row) -> text over a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if _num(r.get(y)) is not None]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group_by), []).append(r)
    n = max(len(groups), 1)
    cols = min(ncols, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.6 * cols, 3.6 * math.ceil(n / cols)),
                             squeeze=False)  # fmt: skip
    flat_axes = [ax for line in axes for ax in line]
    for ax in flat_axes[len(groups):]:
        ax.axis("off")
    for ax, (key, sub) in zip(flat_axes, groups.items()):
        names = list(dict.fromkeys(r[series] for r in sub))
        sizes = sorted({int(float(r["numel"])) for r in sub if _num(r.get("numel")) is not None})
        if len(sizes) > 1:
            for name in names:
                pts = sorted((float(r["numel"]), _num(r[y]) * scale) for r in sub if r[series] == name)
                ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=name, color=COLOURS.get(name))
            if roofline:
                best = {}
                for r in sub:
                    if _num(r.get("roofline_gbps")) is not None:
                        best.setdefault(float(r["numel"]), []).append(float(r["roofline_gbps"]))
                pts = sorted((p, sorted(v)[len(v) // 2]) for p, v in best.items())
                ax.plot([p for p, _ in pts], [v for _, v in pts], "k--", label="STREAM triad (roofline)")
            ax.set(xscale="log", xlabel="elements (P)", yscale="log" if logy else "linear")
        else:
            vals = [_num(next(r[y] for r in sub if r[series] == name)) * scale for name in names]
            bars = ax.bar(names, vals, color="#4f74b3")
            if annotate:
                for bar, name in zip(bars, names):
                    text = annotate(next(r for r in sub if r[series] == name))
                    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=7)  # fmt: skip
            ax.tick_params(axis="x", labelrotation=35, labelsize=7)
            for lab in ax.get_xticklabels():
                lab.set_horizontalalignment("right")
        ax.set_ylabel(ylabel)
        ax.set_title(_label(key, tuple(group_by)), fontsize=9)
        if len(sizes) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ops(rows, path, title) -> Path:
    """Achieved GB/s (the op's real bytes / median) per provider against P, with the
    STREAM-triad roofline of the same rounds; one panel per op, case, tensor count, dtype."""
    ops = [r for r in rows if r["benchmark"] == "ops" and r.get("median_s") not in ("", None)]
    return panels(ops, path, ("op", "case", "tensors", "dtype"), "gbps", "GB/s (bytes moved / median)", title,
                  roofline=True)  # fmt: skip


def plot_optimizer(rows, path, title) -> Path:
    """``bench_ops --optimizer``: achieved GB/s of whole Adam steps per variant against P,
    with the STREAM-triad roofline of the same rounds; one panel per case."""
    sub = [r for r in rows if r["benchmark"] == "optimizer" and r.get("median_s") not in ("", None)]
    return panels(sub, path, ("case", "tensors", "dtype"), "gbps", "GB/s (bytes moved / median)", title,
                  roofline=True, ncols=2)  # fmt: skip


def _ratio_note(r) -> str:
    ratio = _num(r.get("ratio_vs_baseline"))
    return f"{ratio:.2f}×" if ratio is not None else ""


def plot_meta_iteration(rows, path, title) -> Path:
    """Meta-iterations per second per mode, one panel per net; bars say × vs the seed loop."""
    sub = [r for r in rows if r["benchmark"] == "meta_iteration"]
    return panels(sub, path, ("case",), "value", "meta-iterations / s (median)", title, annotate=_ratio_note, ncols=2)


def plot_distributed(rows, path, title) -> Path:
    """meta_step() and all-reduce milliseconds against P, one line per process count."""
    sub = [r for r in rows if r["benchmark"] == "distributed"]
    return panels(sub, path, ("op",), "median_s", "median ms", title, series="case", scale=1e3, ncols=2, logy=True)


def plot_eval(rows, path, title) -> Path:
    """Evaluation tasks per second per mode (sequential, batched_N), one panel per net; bars say × vs sequential."""
    sub = [r for r in rows if r["benchmark"] == "eval"]
    return panels(sub, path, ("case",), "value", "evaluation tasks / s (median)", title, annotate=_ratio_note, ncols=2)
