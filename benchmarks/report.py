"""Markdown tables from the results CSV (rows of the harness schema), and the benchmark
section of the documentation (docs/benchmarks.md) regenerated from them.

    python benchmarks/report.py                                  # print the tables
    python benchmarks/report.py --page docs/benchmarks.md        # rewrite the generated block

The generated block lies between the two marker comments ``BEGIN`` and ``END`` below; the
text outside them is not touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness as h  # noqa: E402

BEGIN = "<!-- BEGIN benchmarks/report.py: generated from benchmarks/results/benchmarks.csv -->"
END = "<!-- END benchmarks/report.py -->"
SEED = {"sgd_step_": "torch-forloop", "adam_step_": "torch-forloop", "task_end_": "seed loop",
        "meta_update_": "seed loop", "batched_meta_update_": "reference"}  # fmt: skip
SHARED = ("The machines were shared with other jobs during these runs (other engineers' test runs on the "
          "same 2 cores), so every time is a median of interleaved rounds and every ratio compares medians "
          "from the same rounds; the same case measured in another run can move by 10% or more.")  # fmt: skip


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _cell(template: str, scale: float = 1.0):
    """A formatter of CSV values: ``template`` applied to value × ``scale``, "—" if blank."""

    def fmt(v) -> str:
        x = _f(v)
        return "—" if x is None else template.format(x * scale)

    return fmt


_ms = _cell("{:.3g}", 1e3)  # seconds -> milliseconds
_pct = _cell("{:.0f}%", 100)
_x = _cell("{:.2f}×")
_g = _cell("{:.2g}")


def _p(n) -> str:
    n = int(float(n))
    e = len(str(n)) - 1
    m = n / 10**e
    return f"10{_sup(e)}" if m == 1 else f"{m:.3g}·10{_sup(e)}"


def _sup(e: int) -> str:
    return str(e).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _table(header, lines) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]


def _find(rows, **kv):
    for r in rows:
        if all(str(r[k]) == str(v) for k, v in kv.items()):
            return r
    return None


# --------------------------------------------------------------------- ops


FUSED_PROVIDER = "cpp-fused"  # bench_ops: cpp's adam_step_(fused=True), torch's fused Adam arithmetic


def ops_table(rows, device="cpu", threads=None, provider="cpp") -> list[str]:
    """One line per (op, case, dtype): the largest P, the largest tensor count; Adam also
    with ``fused=True`` (provider cpp-fused) when measured."""
    ops = [r for r in rows if r["benchmark"] == "ops" and r["device"] == device and r["median_s"] != ""
           and (threads is None or str(r["threads"]) == str(threads))]  # fmt: skip
    keys = list(dict.fromkeys((r["op"], r["case"], r["dtype"]) for r in ops))
    lines = []
    for op, case, dtype in keys:
        sub = [r for r in ops if (r["op"], r["case"], r["dtype"]) == (op, case, dtype)]
        P = max(int(r["numel"]) for r in sub)
        t = max(int(r["tensors"]) for r in sub if int(r["numel"]) == P)
        at = dict(op=op, case=case, dtype=dtype, numel=P, tensors=t)
        for name in (provider, FUSED_PROVIDER) if provider == "cpp" else (provider,):
            mine = _find(sub, provider=name, **at)
            if mine is not None:
                lines.append(_ops_line(rows, sub, mine, op, case, dtype, P, t, device))
    return _table(["op, case", "dtype", "P", "tensors", f"{provider} ms", "baseline ms", f"{provider} vs baseline",
                   "reference ms", "per-parameter loop ms", "bytes moved", f"{provider} GB/s",
                   "triad GB/s", "roofline fraction", "vs in-place axpy"], lines)  # fmt: skip


def _ops_line(rows, sub, mine, op, case, dtype, P, t, device) -> list:
    at = dict(op=op, case=case, dtype=dtype, numel=P, tensors=t)
    base = _find(sub, provider=mine["baseline_provider"], **at) if mine["baseline_provider"] else None
    ref = _find(sub, provider="reference", **at)
    seed = _find(sub, provider=SEED.get(op, ""), **at) if SEED.get(op) != "reference" else None
    axpy = _find(rows, benchmark="roofline", op=h.AXPY, device=device, threads=mine["threads"],
                 case=", ".join(x for x in (op, case, dtype) if x), numel=P, tensors=t)  # fmt: skip
    fused = " fused=True" if mine["provider"] == FUSED_PROVIDER else ""
    return [
        f"`{op}`" + (f" {case}" if case else "") + fused, dtype, _p(P), t,
        _ms(mine["median_s"]),
        f"{_ms(base['median_s'])} ({mine['baseline_provider']})" if base else "—",
        _x(mine["ratio_vs_baseline"]),
        _ms(ref["median_s"]) if ref else "—",
        f"{_ms(seed['median_s'])} ({seed['provider']})" if seed else "—",
        f"{int(mine['bytes']) / P:g}·P", f"{float(mine['gbps']):.1f}", f"{float(mine['roofline_gbps']):.1f}",
        _pct(mine["roofline_fraction"]),
        _pct(float(mine["gbps"]) / float(axpy["gbps"])) if axpy else "—",
    ]  # fmt: skip


def fraction_table(rows, device="cpu", threads=None, provider="cpp") -> list[str]:
    """Roofline fraction of ``provider`` per op and P (one flat tensor)."""
    ops = [r for r in rows if r["benchmark"] == "ops" and r["device"] == device and r["provider"] == provider
           and r["roofline_fraction"] != "" and (threads is None or str(r["threads"]) == str(threads))]  # fmt: skip
    sizes = sorted({int(r["numel"]) for r in ops})
    keys = list(dict.fromkeys((r["op"], r["case"], r["dtype"]) for r in ops))
    lines = []
    for op, case, dtype in keys:
        cells = []
        for P in sizes:
            r = _find(ops, op=op, case=case, dtype=dtype, numel=P, tensors=1)
            cells.append(_pct(r["roofline_fraction"]) if r else "")
        lines.append([f"`{op}`" + (f" {case}" if case else ""), dtype] + cells)
    return _table(["op, case", "dtype"] + [_p(P) for P in sizes], lines)


def roofline_line(rows, device="cpu", threads=None) -> str:
    rf = [r for r in rows if r["benchmark"] == "roofline" and r["device"] == device
          and (threads is None or str(r["threads"]) == str(threads))]  # fmt: skip
    machines_here = list(dict.fromkeys(r["machine"] for r in rf))
    if len(machines_here) > 1:  # one line per machine: bandwidths of two machines do not mix
        return "; ".join(f"{m}: " + roofline_line([r for r in rf if r["machine"] == m], device, threads)
                         for m in machines_here)  # fmt: skip
    parts = []
    for P in sorted({int(r["numel"]) for r in rf}):
        tri = sorted(float(r["gbps"]) for r in rf if int(r["numel"]) == P and r["op"] == h.TRIAD)
        cop = sorted(float(r["gbps"]) for r in rf if int(r["numel"]) == P and r["op"] == h.COPY)
        axpy = sorted(float(r["gbps"]) for r in rf if int(r["numel"]) == P and r["op"] == h.AXPY)
        parts.append(f"{_p(P)}: triad {tri[len(tri) // 2]:.1f}, copy {cop[len(cop) // 2]:.1f}"
                     + (f", in-place axpy {axpy[len(axpy) // 2]:.1f}" if axpy else ""))
    return "; ".join(parts)


def not_measured(rows, benchmark, device) -> list[str]:
    seen = {}
    for r in rows:
        if r["benchmark"] == benchmark and r["device"] == device and r["note"].startswith(h.NOT_MEASURED):
            seen.setdefault(r["provider"], r["note"])
    return [f"`{p}` ({n.removeprefix(h.NOT_MEASURED + ': ')})" for p, n in seen.items()]


def targets(rows, device="cpu", threads=None) -> list[str]:
    """The targets of issue 3, from the rows."""
    ops = [r for r in rows if r["benchmark"] == "ops" and r["device"] == device and r["median_s"] != ""
           and (threads is None or str(r["threads"]) == str(threads)) and r["dtype"] == "float32"]  # fmt: skip
    lines = []
    bm = [r for r in ops if r["op"] == "batched_meta_update_" and r["provider"] == "cpp"]
    for wb in ("False", "True"):
        cand = [r for r in bm if r["case"].endswith(f"write_back={wb}")]
        if not cand:
            continue
        r = max(cand, key=lambda r: int(r["numel"]))
        base = _find(ops, op=r["op"], case=r["case"], numel=r["numel"], provider="torch")
        lines.append([f"`batched_meta_update_` {r['case']}, P = {_p(r['numel'])}: ≥ 2× torch "
                      "(`theta.lerp_(tasks.mean(0), eps)`" + (" + write-back copy" if wb == "True" else "") + ")",
                      f"{_x(r['ratio_vs_baseline'])} ({_ms(r['median_s'])} vs {_ms(base['median_s'])} ms)",
                      "yes" if (_f(r["ratio_vs_baseline"]) or 0) >= 2 else "NO"])  # fmt: skip
        lines.append([f"same: ≥ 80% of the triad roofline for {int(r['bytes']) // int(r['numel'])}·P bytes",
                      f"{_pct(r['roofline_fraction'])} ({float(r['gbps']):.1f} vs {float(r['roofline_gbps']):.1f} GB/s)",
                      "yes" if float(r["roofline_fraction"]) >= 0.8 else "NO"])  # fmt: skip
    lines += adam_targets(ops, "ops", FUSED_PROVIDER)
    for r in sorted((r for r in ops if r["op"] == "sgd_step_" and r["provider"] == "cpp" and int(r["tensors"]) >= 200),
                    key=lambda r: int(r["numel"])):  # fmt: skip
        base = _find(ops, op=r["op"], case=r["case"], numel=r["numel"], tensors=r["tensors"], provider="torch-fused")
        lines.append([f"`sgd_step_` momentum, {r['tensors']} tensors, P = {_p(r['numel'])}: ≥ 1.5× torch-fused",
                      f"{_x(r['ratio_vs_baseline'])} ({_ms(r['median_s'])} vs {_ms(base['median_s']) if base else '—'} ms)",
                      "yes" if (_f(r["ratio_vs_baseline"]) or 0) >= 1.5 else "NO"])  # fmt: skip
    return _table(["target", "measured", "met"], lines)


# Issue 22: Adam with torch's fused arithmetic, 200 tensors, one thread: at least these
# multiples of torch.optim.Adam(fused=True), and 90% of the triad roofline.
ADAM_TARGETS = {16 * 10**6: 1.0, 10**6: 1.2}
ADAM_ROOFLINE_TARGET = 0.9


def adam_targets(rows, benchmark, provider) -> list[list[str]]:
    """Target lines for ``provider`` (cpp-fused in the op sweep, ``ReptileOptimizer cpp
    fused=True`` in --optimizer) against torch-fused on 200 tensors, amsgrad off and on."""
    lines = []
    for r in sorted((r for r in rows if r["benchmark"] == benchmark and r["provider"] == provider
                     and int(r["tensors"]) >= 200 and int(r["numel"]) in ADAM_TARGETS and r["median_s"] != ""),
                    key=lambda r: (r["case"], int(r["numel"]))):  # fmt: skip
        base = _find(rows, benchmark=benchmark, op=r["op"], case=r["case"], numel=r["numel"], tensors=r["tensors"],
                     provider="torch-fused")  # fmt: skip
        want = ADAM_TARGETS[int(r["numel"])]
        what = f"`{r['op']}` fused=True" if benchmark == "ops" else f"`{provider}` {r['op']}"
        lines.append([f"{what} {r['case']}, {r['tensors']} tensors, P = {_p(r['numel'])}: "
                      f"≥ {want:g}× torch-fused",
                      f"{_x(r['ratio_vs_baseline'])} ({_ms(r['median_s'])} vs {_ms(base['median_s']) if base else '—'} ms)",
                      "yes" if (_f(r["ratio_vs_baseline"]) or 0) >= want else "NO"])  # fmt: skip
        lines.append([f"same: ≥ {ADAM_ROOFLINE_TARGET:.0%} of the triad roofline for "
                      f"{int(r['bytes']) // int(r['numel'])}·P bytes",
                      f"{_pct(r['roofline_fraction'])} ({float(r['gbps']):.1f} vs {float(r['roofline_gbps']):.1f} GB/s)",
                      "yes" if float(r["roofline_fraction"]) >= ADAM_ROOFLINE_TARGET else "NO"])  # fmt: skip
    return lines


OPTIMIZER_FUSED = "ReptileOptimizer cpp fused=True"
ADAM_NOTE = ("Reading the Adam targets: at 10⁶ parameters the buffers sit in the CPU's last-level cache "
             "and each element costs a square root and a division (the quotient by the bias correction is a "
             "multiply and two fused multiply-adds that round exactly as the divide), so the step is bound by "
             "the divider, near or below the in-cache triad; torch's fused kernel divides twice and dispatches "
             "once per tensor. At 1.6·10⁷ both kernels move the same bytes per element from memory, so the "
             "ratio is near 1, decided by each step's other costs and by the run-to-run noise of this shared "
             "machine.")


def optimizer_table(rows, device="cpu") -> list[str]:
    """``bench_ops --optimizer``: every variant's whole Adam step, per case and P."""
    sub = [r for r in rows if r["benchmark"] == "optimizer" and r["device"] == device and r["median_s"] != ""]
    lines = []
    for r in sorted(sub, key=lambda r: (r["case"], int(r["numel"]), float(r["median_s"]))):
        lines.append([r["case"], _p(r["numel"]), r["tensors"], r["threads"], r["provider"], _ms(r["median_s"]),
                      _x(r["ratio_vs_baseline"]), f"{float(r['gbps']):.1f}", f"{float(r['roofline_gbps']):.1f}",
                      _pct(r["roofline_fraction"])])  # fmt: skip
    return _table(["case", "P", "tensors", "threads", "step", "ms", "vs torch-fused", "GB/s", "triad GB/s",
                   "roofline fraction"], lines)  # fmt: skip


def optimizer_markdown(rows, env) -> str:
    """The .md written beside one ``bench_ops.py --optimizer`` run."""
    dev = next((r["device"] for r in rows if r["benchmark"] == "optimizer"), "cpu")
    lines = [f"# Whole Adam steps: {env['machine']} ({env['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", SHARED, "", "## Targets (issue 22)", ""]
    lines += _table(["target", "measured", "met"], adam_targets(rows, "optimizer", OPTIMIZER_FUSED))
    lines += ["", ADAM_NOTE, "", "## Every variant, same rounds", ""] + optimizer_table(rows, dev)
    return "\n".join(lines) + "\n"


def ops_markdown(rows, env) -> str:
    """The .md written beside one bench_ops run."""
    dev = next((r["device"] for r in rows if r["benchmark"] == "ops"), "cpu")
    lines = [f"# Op benchmark: {env['machine']} ({env['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", SHARED, "", "## Targets", ""] + targets(rows, dev) + ["", ADAM_NOTE]
    lines += ["", "## Largest size per case", ""] + ops_table(rows, dev)
    lines += ["", "## cpp: fraction of the STREAM-triad roofline, one tensor", ""] + fraction_table(rows, dev)
    lines += ["", "STREAM GB/s in the same rounds (median over cases): " + roofline_line(rows, dev)]
    nm = not_measured(rows, "ops", dev)
    if nm:
        lines += ["", "Not measured: " + "; ".join(nm)]
    return "\n".join(lines) + "\n"


FOMAML_SUFFIX = ", no update"  # bench_ops: the provider timed without first-order MAML's update buffer


def fomaml_table(rows, device="cpu") -> list[str]:
    """First-order MAML's update buffer: each backend's op with it against the same op
    without it, from the same rounds (``bench_ops.py --fomaml``)."""
    lines = []
    for r in rows:
        if r["benchmark"] != "ops" or r["device"] != device or "fomaml" not in str(r["case"]):
            continue
        if str(r["provider"]).endswith(FOMAML_SUFFIX) or r.get("median_s") in ("", None):
            continue
        base = _find(rows, benchmark="ops", device=device, op=r["op"], case=r["case"], dtype=r["dtype"],
                     numel=r["numel"], provider=f"{r['provider']}{FOMAML_SUFFIX}")  # fmt: skip
        if base is None or base.get("median_s") in ("", None):
            continue
        with_u, without = float(r["median_s"]), float(base["median_s"])
        lines.append([
            r["op"], r["provider"], r["dtype"], _p(int(r["numel"])), f"{without * 1e3:.3f}", f"{with_u * 1e3:.3f}",
            f"{with_u / without:.2f}×", f"{int(r['bytes']) / int(base['bytes']):.2f}×",
            _pct(base.get("roofline_fraction")), _pct(r.get("roofline_fraction")),
        ])  # fmt: skip
    header = ["op", "backend", "dtype", "P", "ms without update", "ms with update", "time ×", "bytes ×",
              "roofline without", "roofline with"]  # fmt: skip
    return _table(header, lines) if lines else ["not measured"]


def fomaml_markdown(rows, env) -> str:
    """The .md written beside one ``bench_ops.py --fomaml`` run."""
    dev = next((r["device"] for r in rows if r["benchmark"] == "ops"), "cpu")
    lines = [f"# First-order MAML's update buffer: {env['machine']} ({env['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", SHARED, "", "## Each op with and without writing/reading the update, same rounds", ""]
    lines += fomaml_table(rows, dev)
    lines += ["", "STREAM GB/s in the same rounds (median over cases): " + roofline_line(rows, dev)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- other benchmarks


def meta_table(rows, device="cpu") -> list[str]:
    out = []
    sub = [r for r in rows if r["benchmark"] == "meta_iteration" and r["device"] == device]
    for case in dict.fromkeys(r["case"] for r in sub):
        lines = []
        for r in (r for r in sub if r["case"] == case):
            if r["median_s"] == "":
                lines.append([r["provider"], r["note"], "", "", "", ""])
                continue
            lines.append([r["provider"], f"{float(r['value']):.3g}", _x(r["ratio_vs_baseline"]),
                          r["peak_mib"] or "—", _g(r["max_abs_diff_vs_baseline"]),
                          _g(r["max_abs_diff_vs_float64"])])  # fmt: skip
        first = next(r for r in sub if r["case"] == case and r["median_s"] != "")
        out += [f"*{case}* ({first['threads']} thread(s), medians of {first['rounds']} rounds; {first['note']}):", ""]
        out += _table(["mode", "meta-it/s", "vs seed", "peak MiB", "max abs Δθ vs seed", "vs seed in float64"],
                      lines) + [""]  # fmt: skip
    return out


def distributed_table(rows) -> list[str]:
    sub = [r for r in rows if r["benchmark"] == "distributed"]
    lines = []
    for r in (r for r in sub if r["op"] == "meta_step"):
        red = _find(sub, op="all_reduce", case=r["case"], numel=r["numel"])
        lines.append([r["case"], _p(r["numel"]), _ms(r["median_s"]), _ms(red["median_s"]) if red else "—",
                      _pct(r["value"]) if r["metric"] == "all_reduce_share" else "—"])  # fmt: skip
    return _table(["processes", "P", "meta_step ms", "all-reduce ms", "all-reduce share"], lines)


def _meta(rows, benchmark):
    sub = [r for r in rows if r["benchmark"] == benchmark]
    if not sub:
        return None
    return sub[0]["machine"], max(r["date"] for r in sub), sub[0]["torch"]


def _dtype_key(r) -> str:
    # A STREAM row's dtype is float32 whatever the op's; its case names the op's dtype last.
    return r["case"].rsplit(", ", 1)[-1] if r["benchmark"] == "roofline" else r["dtype"]


def latest(rows) -> list[dict]:
    """Per (benchmark, device, threads, dtype), only the rows of the machine measured last.
    The CSV keeps every machine's runs; a table compares measurements of one machine."""
    newest: dict[tuple, tuple[str, str]] = {}

    def key(r):
        return r["benchmark"], r["device"], r["threads"], _dtype_key(r)

    for r in rows:
        k = key(r)
        if k not in newest or r["date"] > newest[k][0]:
            newest[k] = (r["date"], r["machine"])
    return [r for r in rows if r["machine"] == newest[key(r)][1]]


def machines(rows, benchmark, device, threads=None) -> str:
    """Which machine (and date, torch) each dtype's rows of a table come from, in words."""
    seen: dict[tuple, set] = {}
    for r in rows:
        if r["benchmark"] == benchmark and r["device"] == device and r["dtype"] and (
            threads is None or r["threads"] == threads
        ):
            seen.setdefault((r["machine"], r["torch"]), set()).add((r["dtype"], r["date"]))
    parts = []
    for (machine, torch_version), items in seen.items():
        dtypes = ", ".join(sorted({d for d, _ in items}))
        dates = "/".join(sorted({d for _, d in items}))
        parts.append(f"{dtypes} on {machine}, torch {torch_version}, {dates}")
    return "; ".join(parts)


def page_section(rows) -> str:
    rows = latest(rows)
    out = [BEGIN, ""]
    info = _meta(rows, "ops")
    if info:
        threads = sorted({r["threads"] for r in rows if r["benchmark"] == "ops" and r["device"] == "cpu"})
        out += [f"**Fused ops on the CPU** (`benchmarks/bench_ops.py`; threads: {', '.join(threads)}; each table "
                f"names its machine: the CSV keeps every machine's runs, a table shows the newest machine's). "
                f"{SHARED} Bytes are what each op must read plus write "
                "(`benchmarks/harness.py: bytes_moved`; `batched_meta_update_` with write-back moves (2n+2)·4·P), "
                "and the roofline is a STREAM triad `a = b + s·c` into a preallocated output over the same "
                "footprint, timed in the same rounds; the roofline fraction is (bytes / median) / triad GB/s. "
                "Fractions above 100% at one thread are not faster-than-memory kernels: STREAM counts 3 words per "
                "triad element, but the CPU also reads each output line before writing it (write-allocate, 4 words "
                "moved), which the in-place ops never pay (they write lines they have just read: compare the "
                "in-place axpy `a += s·b` below, same rounds), and one core's bandwidth grows with the number of "
                "streams it keeps in flight (`batched_meta_update_` reads 6 arrays, the triad 2). `copy_`, the "
                "old roofline, is listed too.", ""]  # fmt: skip
        for t in threads:
            n_rounds = sorted({int(r["rounds"]) for r in rows if r["benchmark"] == "ops" and r["device"] == "cpu"
                               and r["threads"] == t and r["rounds"]})  # fmt: skip
            out += [f"*{t} thread(s)* ({machines(rows, 'ops', 'cpu', t)}), medians of "
                    f"{'/'.join(map(str, n_rounds))} interleaved rounds"
                    + ("" if t == "1" else ": a parallel region waits for its slowest thread, and on this loaded "
                       "machine that thread is often descheduled, so these numbers are dominated by scheduling "
                       "noise; the 1-thread tables are the stable measurement") + ".", ""]  # fmt: skip
            out += [f"Targets, {t} thread(s):", ""] + targets(rows, "cpu", t) + [""]
            out += [f"Largest size per case, {t} thread(s) (baseline: the strongest PyTorch equivalent, "
                    "same rounds; per-parameter loop: the seed sketch's):", ""] + ops_table(rows, "cpu", t) + [""]
            out += [f"cpp, fraction of the triad roofline per P (one tensor), {t} thread(s):", ""]
            out += fraction_table(rows, "cpu", t) + [""]
            out += [f"STREAM GB/s in the same rounds, {t} thread(s): {roofline_line(rows, 'cpu', t)}.", ""]
        nm = not_measured(rows, "ops", "cpu")
        if nm:
            out += ["Not measured on the CPU: " + "; ".join(nm) + ".", ""]
    opt_rows = [r for r in rows if r["benchmark"] == "optimizer" and r["device"] == "cpu" and r["median_s"] != ""]
    if opt_rows:
        out += [f"**Whole Adam steps on the CPU** (`benchmarks/bench_ops.py --optimizer`; {opt_rows[0]['machine']}, "
                f"{max(r['date'] for r in opt_rows)}): `ReptileOptimizer(inner_optimizer=\"adam\", fused=...).step()` "
                "against `torch.optim.Adam(fused=True / foreach=False).step()` on the same 200 parameter tensors, "
                "everything a step pays included; `fused=True` reproduces `torch.optim.Adam(fused=True)` bit for "
                "bit, the default reproduces the for-loop Adam. Bytes and roofline as above.", ""]
        out += ["Targets:", ""] + _table(["target", "measured", "met"],
                                         adam_targets(rows, "optimizer", OPTIMIZER_FUSED)) + [""]  # fmt: skip
        out += [ADAM_NOTE, ""]
        out += optimizer_table(rows, "cpu") + [""]
    gpu = [r for r in rows if r["device"] == "cuda" and r["benchmark"] == "ops" and r["median_s"] != ""]
    if gpu:
        launches = {r["op"]: r["value"] for r in rows if r["metric"] == "cuda_kernel_launches"}
        out += [f"**Ops on the GPU** (`benchmarks/bench_ops.py --device cuda`; {gpu[0]['machine']}, "
                f"{max(r['date'] for r in gpu)}):", ""] + ops_table(rows, "cuda") + [""]
        out += ["triton, fraction of the triad roofline per P (one tensor):", ""]
        out += fraction_table(rows, "cuda", provider="triton") + [""]
        out += ["cpp, fraction of the triad roofline per P (one tensor):", ""]
        out += fraction_table(rows, "cuda") + [""]
        if launches:
            out += ["CUDA kernels per cpp op call (200-tensor model): "
                    + ", ".join(f"`{k}` {v}" for k, v in launches.items()) + ".", ""]
    else:
        out += ["**GPU** (ops, Triton, CUDA graphs): not measured (no GPU was available for these runs).", ""]
    # The table below is the CPU's: its heading names the CPU rows' machine, not a GPU's.
    info = _meta([r for r in rows if r["device"] == "cpu"], "meta_iteration")
    if info:
        out += [f"**Meta-iterations per second** (`benchmarks/bench_meta_iteration.py`; {info[0]}, {info[1]}): "
                "one meta-iteration = n tasks × k inner SGD steps + the meta update, the modes are described in "
                "the script; max |Δθ| compares θ after one meta-iteration with the seed loop's, and with the seed "
                "loop run in float64 (what float32 rounding alone moves).", ""]  # fmt: skip
        out += meta_table(rows, "cpu")
    info = _meta(rows, "distributed")
    if info:
        out += [f"**Distributed meta step** (`benchmarks/bench_distributed.py`; gloo, {info[0]}, {info[1]}): "
                "`meta_step()` time (without the task's own cost) and the all-reduce alone, per process count, "
                "interleaved rounds with a barrier around each call. The share is the ratio of the two medians; "
                "with two processes on two shared cores the small sizes are dominated by scheduling, where it "
                "can exceed 100%.", ""]
        out += distributed_table(rows) + [""]
    out += ["Everything above is rendered by `python benchmarks/report.py --page docs/benchmarks.md` from "
            "`benchmarks/results/benchmarks.csv` (one schema: `benchmarks/harness.py: SCHEMA`); the charts are "
            "`benchmarks/results/*.png`.", "", END]  # fmt: skip
    return "\n".join(out)


def update_page(page: Path, rows) -> None:
    """Rewrite the generated block of ``page`` (a Markdown file holding the two markers)."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page}: the markers are missing:\n{BEGIN}\n{END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(head + page_section(rows) + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, nargs="+", default=[h.RESULTS / "benchmarks.csv"])
    ap.add_argument("--page", type=Path, default=None,
                    help="rewrite the generated block of this Markdown page (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    rows = [r for path in args.csv for r in h.read_csv(path)]
    if args.page:
        update_page(args.page, rows)
        print(f"updated {args.page}")
    else:
        print(page_section(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
