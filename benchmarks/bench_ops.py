"""Benchmark of the flat-buffer ops: every backend (reference, cpp, triton) against
PyTorch's best existing primitives and the seed sketch's per-parameter loops, with a
STREAM triad, timed in the same rounds, as the roofline.

    python benchmarks/bench_ops.py                      # CPU, full sweep (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --device cuda        # GPU sweep (adds P = 6.4e7)
    python benchmarks/bench_ops.py --quick              # fewer repeats and sizes
    python benchmarks/bench_ops.py --ops task_end_ meta_update_ --dtypes bfloat16
    python benchmarks/bench_ops.py --fomaml             # first-order MAML's update buffer: its price
    python benchmarks/bench_ops.py --optimizer          # whole Adam steps: ReptileOptimizer vs torch.optim.Adam

Providers: ``reference``, ``cpp``, ``triton`` (the backends, on one flat buffer);
``cpp-fused`` (``adam_step_(fused=True)``: torch's fused Adam arithmetic, one pass);
``torch-fused`` / ``torch-foreach`` / ``torch-forloop`` (``torch.optim`` over the
parameter tensors); ``torch`` (``theta.lerp_(tasks.mean(0), eps)``); ``seed loop``
(the sketch's per-parameter Python loop).  A provider that cannot run here gets one
row with ``note = "not measured: <why>"``.

``--optimizer`` times whole optimizer steps instead (rows ``benchmark=optimizer``):
``ReptileOptimizer(inner_optimizer="adam", fused=...).step()`` on each backend against
``torch.optim.Adam(fused=True / foreach=False).step()`` on the same parameter tensors,
everything a user's step pays (gradient checks, grouping by step count) included.

Writes rows of the harness schema into ``<out>/benchmarks.csv`` (rows of other runs
stay), and ``<out>/ops_<tag>.png`` / ``.md`` for this run.  Timing, roofline and byte
counts: ``benchmarks/harness.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import harness as h  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402

from reptile_fused.backends import get_backend, unavailable_reason  # noqa: E402

BACKENDS = ("reference", "cpp", "triton")
OPS = ("batched_meta_update_", "sgd_step_", "adam_step_", "task_end_", "meta_update_")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
N_TASKS = 5


def _rand(n, device, dtype=torch.float32):
    return torch.randn(n, device=device).to(dtype)


def _sizes(total: int, count: int) -> list[int]:
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _model(total: int, count: int, device: str, dtype):
    """``count`` parameters of about equal size summing to ``total`` elements, as views
    into one flat buffer (the layout ReptileOptimizer builds), with gradients."""
    flat, flat_grad = _rand(total, device, dtype), _rand(total, device, dtype)
    params, start = [], 0
    for s in _sizes(total, count):
        p = flat[start : start + s]
        p.grad = flat_grad[start : start + s]
        params.append(p)
        start += s
    return flat, flat_grad, params


def _spans(flat, params) -> tuple[int, ...]:
    """The (offset, numel) pairs of ``params`` in ``flat``: adam_step_(fused=True)'s ``spans``."""
    return tuple(x for p in params for x in (p.storage_offset() - flat.storage_offset(), p.numel()))


def _views(buf, flat, params):
    """``buf`` split like ``params`` split ``flat``."""
    return [buf[p.storage_offset() - flat.storage_offset() :][: p.numel()] for p in params]


# --------------------------------------------------------------------- cases
# Each builder returns (variants, baseline provider, bytes_moved kwargs).


def case_batched(backends, device, P, count, dtype, write_back):
    theta, tasks = _rand(P, device, dtype), _rand(N_TASKS * P, device, dtype).view(N_TASKS, P)
    eps = 0.5
    v = {name: (lambda be=be: be.batched_meta_update_(theta, tasks, eps, write_back=write_back))
         for name, be in backends.items()}  # fmt: skip
    if write_back:
        def torch_lerp():
            theta.lerp_(tasks.mean(0), eps)
            tasks.copy_(theta.expand_as(tasks))
    else:
        def torch_lerp():
            theta.lerp_(tasks.mean(0), eps)
    v["torch"] = torch_lerp
    return v, "torch", dict(n=N_TASKS, write_back=write_back)


def _optimizers(cls, params, **kw):
    out = {}
    for name, flag in (("torch-fused", dict(fused=True)), ("torch-foreach", dict(foreach=True)),
                       ("torch-forloop", dict(foreach=False))):  # fmt: skip
        try:
            out[name] = cls(params, **kw, **flag).step
        except (RuntimeError, ValueError) as exc:  # e.g. no fused kernel for this device/dtype
            out[name] = exc
    return out


NO_UPDATE = report.FOMAML_SUFFIX
FUSED = report.FUSED_PROVIDER  # cpp's adam_step_(fused=True)


def _with_and_without_update(backends, call, P, device, dtype):
    """First-order MAML's price: each backend writing its update (``call(be, u)``), and
    the same backend without it (provider ``"<name>, no update"``), in the same rounds."""
    u = torch.zeros(P, device=device, dtype=h.opmath(dtype))
    v = {}
    for name, be in backends.items():
        v[name] = lambda be=be: call(be, u)
        v[name + NO_UPDATE] = lambda be=be: call(be, None)
    baseline = ("cpp" if "cpp" in backends else next(iter(backends), "reference")) + NO_UPDATE
    return v, baseline, dict(update=True)


def case_sgd(backends, device, P, count, dtype, momentum=True, update=False):
    flat, grad, params = _model(P, count, device, dtype)
    buf = torch.zeros_like(flat)
    if update:
        v, baseline, kw = _with_and_without_update(
            backends, lambda be, u: be.sgd_step_(flat, grad, buf, 1e-3, momentum=0.9, update=u), P, device, dtype
        )
        return v, baseline, dict(momentum=True, **kw)
    v = {name: (lambda be=be: be.sgd_step_(flat, grad, buf, 1e-3, momentum=0.9)) for name, be in backends.items()}
    v.update(_optimizers(torch.optim.SGD, params, lr=1e-3, momentum=0.9))
    return v, "torch-fused", dict(momentum=True)


def case_adam(backends, device, P, count, dtype, amsgrad, update=False):
    flat, grad, params = _model(P, count, device, dtype)
    m, s = torch.zeros_like(flat), torch.zeros_like(flat)
    vmax = torch.zeros_like(flat) if amsgrad else None
    if update:
        v, baseline, kw = _with_and_without_update(
            backends, lambda be, u: be.adam_step_(flat, grad, m, s, vmax, 10, 1e-3, amsgrad=amsgrad, update=u),
            P, device, dtype,
        )  # fmt: skip
        return v, baseline, dict(amsgrad=amsgrad, **kw)
    v = {name: (lambda be=be: be.adam_step_(flat, grad, m, s, vmax, 10, 1e-3, amsgrad=amsgrad))
         for name, be in backends.items()}  # fmt: skip
    if "cpp" in backends:
        spans = _spans(flat, params)
        v[FUSED] = lambda: backends["cpp"].adam_step_(flat, grad, m, s, vmax, 10, 1e-3, amsgrad=amsgrad, fused=True,
                                                     spans=spans)  # fmt: skip
    v.update(_optimizers(torch.optim.Adam, params, lr=1e-3, amsgrad=amsgrad))
    return v, "torch-fused", dict(amsgrad=amsgrad)


def case_task_end(backends, device, P, count, dtype, update=False):
    flat, _, params = _model(P, count, device, dtype)
    anchor, acc = _rand(P, device, dtype), torch.zeros(P, device=device, dtype=h.opmath(dtype))
    if update:
        return _with_and_without_update(backends, lambda be, u: be.task_end_(flat, anchor, acc, u), P, device, dtype)
    anchors, accs = _views(anchor, flat, params), _views(acc, flat, params)
    v = {name: (lambda be=be: be.task_end_(flat, anchor, acc)) for name, be in backends.items()}

    def foreach():
        torch._foreach_add_(accs, params)
        torch._foreach_copy_(params, anchors)

    def seed_loop():  # the sketch: adapted_sum[name] += param, then param.copy_(original[name])
        for p, a, c in zip(params, anchors, accs):
            c.add_(p)
            p.copy_(a)

    v.update({"torch-foreach": foreach, "seed loop": seed_loop})
    return v, "torch-foreach", {}


def case_meta_update(backends, device, P, count, dtype):
    flat, _, params = _model(P, count, device, dtype)
    anchor, acc = _rand(P, device, dtype), _rand(P, device, h.opmath(dtype))
    anchors, accs = _views(anchor, flat, params), _views(acc, flat, params)
    seed_params = [p.clone() for p in params]  # the seed rebinds .data: keep it off the shared views
    eps, n = 0.5, 3
    v = {name: (lambda be=be: be.meta_update_(flat, anchor, acc, eps, n)) for name, be in backends.items()}

    def foreach():
        ends = torch._foreach_div(accs, float(n))
        if dtype != acc.dtype:  # 16-bit params, float32 acc: lerp in float32, round once on store
            starts = [a.float() for a in anchors]
            torch._foreach_lerp_(starts, ends, eps)
            torch._foreach_copy_(params, starts)
        else:
            torch._foreach_copy_(params, anchors)
            torch._foreach_lerp_(params, ends, eps)
        torch._foreach_zero_(accs)

    def seed_loop():  # the sketch: param.data = original + meta_lr * (adapted_sum / n - original)
        for p, a, c in zip(seed_params, anchors, accs):
            p.data = (a + eps * (c / n - a)).to(p.dtype)
            c.zero_()

    v.update({"torch-foreach": foreach, "seed loop": seed_loop})
    return v, "torch-foreach", {}


FOMAML_CASES = {
    "sgd_step_": ("momentum=0.9, fomaml update", {}),
    "adam_step_": ("amsgrad=False, fomaml update", dict(amsgrad=False)),
    "task_end_": ("fomaml update", {}),
}


def cases(op, sizes, counts, quick, fomaml=False):
    """(case text, builder kwargs, numel, tensors) for each case of ``op``; ``counts``:
    tensor counts for sgd_step_ and for the others.  ``fomaml``: instead, the ops that
    first-order MAML changes, with and without their update buffer, on one tensor."""
    if fomaml:
        if op in FOMAML_CASES:
            text, kw = FOMAML_CASES[op]
            for P in sizes["model"]:
                yield text, dict(kw, update=True), P, 1
        return
    if op == "batched_meta_update_":
        for wb in (False, True):
            for P in sizes["big"]:
                yield f"n={N_TASKS}, write_back={wb}", dict(write_back=wb), P, 1
    elif op == "sgd_step_":
        for P in sizes["model"]:
            for c in counts["sgd"]:
                if c <= P:
                    yield "momentum=0.9", {}, P, c
    elif op == "adam_step_":
        for ams in (False, True):
            for P in sizes["model"][-1:] if quick else sizes["model"][-2:]:
                for c in counts["other"]:
                    yield f"amsgrad={ams}", dict(amsgrad=ams), P, c
    else:
        for P in sizes["reptile"]:
            for c in counts["other"]:
                yield "", {}, P, c


BUILDERS = {"batched_meta_update_": case_batched, "sgd_step_": case_sgd, "adam_step_": case_adam,
            "task_end_": case_task_end, "meta_update_": case_meta_update}  # fmt: skip


def run_case(timer, device, op, case, kwargs, P, count, dtype, backends, providers=None, baseline=None):
    """Rows of one case: each provider (only ``providers``, if given) and the STREAM
    kernels, timed in the same rounds; ratios against ``baseline`` (default: the case's)."""
    variants, case_baseline, byte_kw = BUILDERS[op](backends, device, P, count, dtype, **kwargs)
    if providers:
        variants = {k: v for k, v in variants.items() if k in providers}
    common = dict(benchmark="ops", op=op, case=case, device=device, dtype=dtype, numel=P, tensors=count)
    rows, runnable = [], {}
    for name, fn in variants.items():
        try:
            if isinstance(fn, Exception):
                raise fn
            fn()
            runnable[name] = fn
        except (RuntimeError, ValueError, TypeError) as exc:
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            rows.append(h.make_row(**common, provider=name, note=f"{h.NOT_MEASURED}: {msg}"))
    nbytes = h.bytes_moved(op, P, dtype, **byte_kw)
    foot = h.footprint_bytes(op, P, dtype, **{k: v for k, v in byte_kw.items() if k != "write_back"})
    stats, bw = h.timed_with_roofline(timer, runnable, foot, device)
    for name, s in stats.items():
        # The same backend timed without first-order MAML's update buffer moves fewer bytes.
        own = h.bytes_moved(op, P, dtype, **dict(byte_kw, update=False)) if name.endswith(NO_UPDATE) else nbytes
        rows.append(h.make_row(**common, provider=name, **s, bytes=own, roofline_gbps=bw[h.TRIAD]))
    for name in bw:
        # The case's dtype goes into the case text: the STREAM buffers are float32 whatever the op's dtype.
        rows.append(h.make_row(benchmark="roofline", op=name, case=roofline_case(op, case, dtype), provider="torch",
                               device=device, dtype=torch.float32, numel=P, tensors=count, gbps=bw[name],
                               roofline_gbps=bw[h.TRIAD], rounds=timer.rounds,
                               note=f"footprint {foot} bytes"))  # fmt: skip
    h.add_ratios(rows, baseline or case_baseline)
    return rows


def roofline_case(op, case, dtype) -> str:
    """The case text of the STREAM rows timed with ``op``'s case."""
    return ", ".join(x for x in (op, case, str(dtype).removeprefix("torch.")) if x)


def kernel_launches(device: str) -> list[dict]:
    """CUDA kernels launched by one call of each cpp op on a 200-tensor model (metric rows)."""
    from torch.profiler import ProfilerActivity, profile

    cpp = get_backend("cpp", device)
    flat, grad, _ = _model(10**6, 200, device, torch.float32)
    m, v, acc, anchor = (torch.zeros_like(flat) for _ in range(4))
    tasks = _rand(5 * 10**6, device).view(5, -1)
    calls = {
        "sgd_step_": lambda: cpp.sgd_step_(flat, grad, m, 0.1, momentum=0.9),
        "adam_step_": lambda: cpp.adam_step_(flat, grad, m, v, None, 3, 1e-3),
        "task_end_": lambda: cpp.task_end_(flat, anchor, acc),
        "meta_update_": lambda: cpp.meta_update_(flat, anchor, acc, 0.5, 3),
        "batched_meta_update_": lambda: cpp.batched_meta_update_(flat, tasks, 0.5),
    }
    rows = []
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        rows.append(h.make_row(benchmark="ops", op=name, case="kernel launches, 200 tensors", provider="cpp",
                               device=device, dtype=torch.float32, numel=10**6, tensors=200,
                               metric="cuda_kernel_launches", value=launches))  # fmt: skip
    return rows


# --------------------------------------------------------------------- whole optimizer steps


def optimizer_variants(device, P, count, dtype, amsgrad, backends):
    """Whole Adam steps on ``count`` parameter tensors of P elements in all (each variant
    its own copy of the model): ReptileOptimizer per backend and arithmetic, and
    torch.optim.Adam fused and for-loop.  Steps 10 onwards (the bias corrections of a
    running optimizer; the first steps allocate state)."""
    from reptile_fused import ReptileOptimizer

    def params():
        gen = torch.Generator(device="cpu").manual_seed(0)
        ps = []
        for s in _sizes(P, count):
            p = torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            p.grad = torch.randn(s, generator=gen).to(device=device, dtype=dtype)
            ps.append(p)
        return ps

    kw = dict(lr=1e-3, betas=(0.9, 0.999), amsgrad=amsgrad)
    v = {}
    for name in backends:
        if name == "triton" and device == "cpu":
            continue
        for fused in (True, False):
            opt = ReptileOptimizer(params(), inner_optimizer="adam", backend=name, fused=fused, **kw)
            v[f"ReptileOptimizer {name}" + (" fused=True" if fused else "")] = opt.step
    for name, flag in (("torch-fused", dict(fused=True)), ("torch-forloop", dict(foreach=False))):
        v[name] = torch.optim.Adam(params(), **flag, **kw).step
    for step in v.values():
        for _ in range(9):
            step()
    return v


def run_optimizer(device="cpu", rounds=None, sizes=None, count=200, dtype=torch.float32, log=print, providers=None):
    """Rows of ``--optimizer``: each variant's step and the STREAM kernels in the same rounds,
    ratios against torch-fused."""
    rounds = rounds or (9 if device == "cpu" else 15)
    timer = h.Timer(device, rounds, 0.02 if device == "cpu" else 0.005)
    backends, _ = available(device, [n for n in BACKENDS if n != "reference"])
    rows = []
    for P in sizes or [10**6, 16 * 10**6]:
        for amsgrad in (False, True):
            started = time.perf_counter()
            variants = optimizer_variants(device, P, count, dtype, amsgrad, backends)
            if providers:
                variants = {k: f for k, f in variants.items() if k in providers}
            case = f"amsgrad={amsgrad}"
            foot = h.footprint_bytes("adam_step_", P, dtype, amsgrad=amsgrad)
            stats, bw = h.timed_with_roofline(timer, variants, foot, device)
            new = [h.make_row(benchmark="optimizer", op="Adam step()", case=case, provider=name, device=device,
                              dtype=dtype, numel=P, tensors=count, **s,
                              bytes=h.bytes_moved("adam_step_", P, dtype, amsgrad=amsgrad),
                              roofline_gbps=bw[h.TRIAD]) for name, s in stats.items()]  # fmt: skip
            h.add_ratios(new, "torch-fused")
            rows += new
            best = next((r for r in new if r["provider"] == "ReptileOptimizer cpp fused=True"), None)
            log(f"Adam step() {case:14s} P={P:<9d} {count}t  "
                + (f"cpp fused=True {float(best['ratio_vs_baseline']):.2f}x torch-fused  " if best else "")
                + f"({time.perf_counter() - started:.1f} s)")
    return rows


def available(device: str, names=BACKENDS) -> tuple[dict, dict]:
    """(backend modules that can run on ``device``, {name: why not} for the others)."""
    ok, missing = {}, {}
    for name in names:
        reason = unavailable_reason(name, device)
        if reason is None:
            ok[name] = get_backend(name, device)
        else:
            missing[name] = reason
    return ok, missing


def run(device="cpu", quick=False, rounds=None, ops=OPS, dtypes=("float32",), sizes=None, counts=None,
        providers=None, min_batch_s=None, log=print, baseline=None, fomaml=False) -> list[dict]:  # fmt: skip
    """Every case of ``ops`` (the sweep of ``main``); returns the rows."""
    rounds = rounds or (3 if quick else (9 if device == "cpu" else 15))
    timer = h.Timer(device, rounds, min_batch_s or (0.02 if device == "cpu" else 0.005))
    backends, missing = available(device, [n for n in BACKENDS if not providers or n in providers])
    big = [10**4, 10**5, 10**6, 4 * 10**6, 16 * 10**6]
    model = [10**5, 10**6, 16 * 10**6]
    if quick:
        big, model = [10**4, 10**6, 16 * 10**6], [10**6, 16 * 10**6]
    if device == "cuda":
        big, model = big + [64 * 10**6], model + [64 * 10**6]
    reptile = [10**6, big[-1]]
    if sizes:
        big = model = reptile = list(sizes)
    counts = {"sgd": counts or ([1, 200] if quick else [1, 20, 200]), "other": counts or [1, 200]}
    rows = []
    for op in ops:
        for name, why in missing.items():
            rows.append(h.make_row(benchmark="ops", op=op, provider=name, device=device,
                                   note=f"{h.NOT_MEASURED}: {why}"))  # fmt: skip
        for dname in dtypes:
            for case, kw, P, count in cases(op, {"big": big, "model": model, "reptile": reptile}, counts, quick, fomaml):
                started = time.perf_counter()
                new = run_case(timer, device, op, case, kw, P, count, DTYPES[dname], backends, providers, baseline)
                rows += new
                best = max((r for r in new if r["provider"] in (*backends, FUSED) and r["roofline_fraction"] != ""),
                           key=lambda r: float(r["roofline_fraction"]), default=None)  # fmt: skip
                log(f"{op:21s} {case:24s} {dname:8s} P={P:<9d} {count:>3d}t  "
                    + (f"best {best['provider']} {float(best['roofline_fraction']):.0%} of triad  " if best else "")
                    + f"({time.perf_counter() - started:.1f} s)")
    if device == "cuda" and "cpp" in backends:
        rows += kernel_launches(device)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 9 CPU, 15 CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and rounds (a smoke run)")
    ap.add_argument("--out", type=Path, default=h.RESULTS, help="results folder (benchmarks.csv, ops_<tag>.png/.md)")
    ap.add_argument("--tag", default=None, help="file name tag (default: the machine and thread count)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's).  On a loaded machine 1 thread is the stable "
                         "measurement: a parallel region waits for its slowest, possibly descheduled, thread")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="every case at these element counts")
    ap.add_argument("--counts", type=int, nargs="+", default=None, help="parameter tensor counts (default: 1 20 200 for sgd_step_, 1 200 for the others)")
    ap.add_argument("--providers", nargs="+", default=None, help="only these providers (default: all)")
    ap.add_argument("--min-batch-s", type=float, default=None, help="seconds per timed batch of calls")
    ap.add_argument("--fomaml", action="store_true",
                    help="instead of the sweep: what first-order MAML's update buffer costs each backend "
                         "(sgd_step_, adam_step_, task_end_ with and without it, in the same rounds)")
    ap.add_argument("--baseline", default=None, help="provider every ratio compares against (default: per case, "
                    "the strongest PyTorch equivalent)")
    ap.add_argument("--optimizer", action="store_true",
                    help="instead of the sweep: whole Adam steps, ReptileOptimizer (each backend, fused=True and "
                         "False) against torch.optim.Adam (fused and for-loop), 200 tensors (--counts), P = 1e6 "
                         "and 1.6e7 (--sizes)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimizer:
        return main_optimizer(args)
    reason = unavailable_reason("cpp", args.device)
    if reason is not None and (not args.providers or "cpp" in args.providers):
        print(f"the fused backend cannot run on {args.device}: {reason}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    env = h.environment(args.device)
    print(f"bench_ops on {env['machine']} ({args.device}), {torch.get_num_threads()} thread(s)", flush=True)
    rows = run(args.device, args.quick, args.rounds, args.ops, args.dtypes, args.sizes, args.counts,
               args.providers, args.min_batch_s, log=lambda s: print(s, flush=True), baseline=args.baseline,
               fomaml=args.fomaml)  # fmt: skip
    render = report.fomaml_markdown if args.fomaml else report.ops_markdown
    return write_results(args, rows, env, started, "ops_fomaml" if args.fomaml else "ops", render,
                         plot.plot_ops, "reptile_fused ops")  # fmt: skip


def write_results(args, rows, env, started, prefix, render, draw, title) -> int:
    """The CSV rows, then ``<prefix>_<machine tag>.md`` (``render(rows, env)``) and ``.png``
    (``draw(rows, path, title)``) in ``args.out``."""
    env["wall_seconds"] = round(time.perf_counter() - started, 1)
    env["load_average_at_end"] = h.environment()["load_average"]
    tag = args.tag or (h.machine_tag(args.device) if args.device == "cuda"
                       else f"{h.machine_tag()}-{torch.get_num_threads()}thread")  # fmt: skip
    csv_path = h.write_csv(args.out / "benchmarks.csv", rows)
    stem = args.out / f"{prefix}_{tag}"
    text = render(rows, env)
    stem.with_suffix(".md").write_text(text)
    draw(rows, stem.with_suffix(".png"), f"{title} on {env['machine']}, {torch.get_num_threads()} thread(s) ({env['date']})")
    print(text)
    print(f"wrote {csv_path} and {stem}.{{md,png}}")
    return 0


def main_optimizer(args) -> int:
    started = time.perf_counter()
    env = h.environment(args.device)
    print(f"bench_ops --optimizer on {env['machine']} ({args.device}), {torch.get_num_threads()} thread(s)", flush=True)
    rows = run_optimizer(args.device, args.rounds, args.sizes, (args.counts or [200])[0], DTYPES[args.dtypes[0]],
                         log=lambda s: print(s, flush=True), providers=args.providers)  # fmt: skip
    return write_results(args, rows, env, started, "optimizer", report.optimizer_markdown, plot.plot_optimizer,
                         "Adam step(), 200 tensors,")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
