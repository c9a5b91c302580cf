"""The ``reptile-fused`` command line: ``demo``, ``train``, ``eval``, ``plot`` and ``presets``.

Hyperparameters keep the flag names of the authors' code (openai/supervised-reptile),
so their commands carry over: ``--classes`` (alias ``--ways``), ``--shots``,
``--train-shots``, ``--inner-batch``, ``--inner-iters``, ``--learning-rate`` (alias
``--inner-lr``), ``--meta-step``, ``--meta-step-final``, ``--meta-batch``,
``--meta-iters``, ``--eval-batch``, ``--eval-iters``, ``--eval-interval``,
``--eval-samples``, ``--transductive``, ``--sgd``, ``--foml``, ``--foml-tail``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import DATASETS, GRADCOMB_NOTE, PAPER_TRANSDUCTIVE, PRESETS, TrainConfig, resolve
from .. import backends
from ..backends import BackendUnavailableError
from ..data import DatasetError
from .runlock import RunLock, RunLockedError

EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _reason(exc: OSError) -> str:
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        # mkdir or open through a path whose "folder" is a file: name that file.
        for parent in [Path(exc.filename), *Path(exc.filename).parents]:
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a folder"
    return exc.strerror or str(exc)


def _check_output(path, flag: str) -> Path:
    """Fail now, before any work, if the file ``path`` cannot be written (its folder is
    created; the file itself is left as it was)."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write there ({_reason(exc)})") from None
    return path


# ---------------------------------------------------------------------- shared flags


def _add_runtime(p: argparse.ArgumentParser, seed_default=None, threads_help=None, conv_layout=True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "cpp", "triton"],
                   help="kernel backend of the optimizer (default: auto, the fastest available)")
    g.add_argument("--seed", type=int, default=seed_default, help="random seed: same seed, same result")
    g.add_argument("--threads", type=int, default=1 if threads_help else None,
                   help=threads_help or "CPU threads for torch (default: torch's choice)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    if conv_layout:
        g.add_argument("--channels-last", action="store_true",
                       help="lay the conv weights out channels-last in the optimizer's flat buffer: the same "
                            "values, faster convolutions on the CPU (see the README's benchmarks)")


def _memory_format(args: argparse.Namespace):
    return torch.channels_last if getattr(args, "channels_last", False) else None


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="sine, omniglot, miniimagenet or folder (a folder of class folders)")
    g.add_argument("--data-root", default=None, help="the dataset folder (nothing is downloaded)")
    g.add_argument("--split", choices=["authors", "background"], default=None,
                   help="Omniglot split: the authors' 1200/423 characters (default) or Lake et al.'s background/evaluation")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the class split (default 0, fixed)")
    g.add_argument("--image-size", type=int, default=None, help="folder datasets: resize to this square size (default 84)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None, help="folder datasets: 1 (grayscale) or 3 (RGB, default)")
    g.add_argument("--model", choices=["omniglot", "miniimagenet"], default=None,
                   help="folder datasets: which of the paper's conv nets (default miniimagenet)")
    g.add_argument("--train-fraction", type=float, default=None,
                   help="folder datasets without train/ and test/: fraction of classes that train (default 0.8)")


def _add_task_shape(g) -> None:
    g.add_argument("--classes", "--ways", dest="classes", type=int, default=None, help="classes per task (N-way)")
    g.add_argument("--shots", type=int, default=None, help="examples per class in an evaluation support set (K-shot)")


def _add_eval_protocol(g) -> None:
    g.add_argument("--eval-batch", type=int, default=None, help="inner batch size when adapting at evaluation")
    g.add_argument("--eval-iters", type=int, default=None, help="inner iterations when adapting at evaluation")
    g.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=None,
                   help="classify all queries in one batch (batch-norm statistics shared across queries)")
    g.add_argument("--eval-batch-tasks", type=int, default=None, metavar="N",
                   help="evaluation tasks adapted at once under vmap (the same tasks as one at a time, scores equal up to "
                        "float32 rounding; "
                        "default: 32 on CUDA, 1 on the CPU, where batching measured no faster)")
    g.add_argument("--eval-cuda-graph", action="store_true",
                   help="record the batched adaptation of the evaluation tasks once as a CUDA graph and replay it "
                        "(CUDA, backend cpp or triton, --eval-batch-tasks of 2 or more)")


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reptile-fused",
        description="Reptile meta-learning (Nichol et al., 2018) with fused flat-buffer kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="meta-train on sine waves for a few minutes and draw Figure 1",
                       description="Meta-train the 1-64-64-1 MLP on sine waves, then compare adapting to new "
                                   "waves from the meta-learned and from a random initialisation.")
    d.add_argument("--out", default="runs/demo/sine_demo.png", help="where to write the PNG (default %(default)s)")
    d.add_argument("--iters", "--meta-iters", dest="iters", type=int, default=None,
                   help="meta-training iterations (default 10000: about a minute on one CPU core)")
    d.add_argument("--test-tasks", type=int, default=200, help="new waves to average the MSE over (default %(default)s)")
    _add_runtime(d, seed_default=0, threads_help="CPU threads (default 1: the MLP is too small to gain from more)",
                 conv_layout=False)

    t = sub.add_parser("train", help="meta-train on a dataset, with checkpoints and a metrics CSV",
                       description="Meta-train with Reptile. Unset flags come from --preset, else from the "
                                   "authors' defaults (sine: the demo's settings).")
    t.add_argument("--out", "--checkpoint", dest="out", required=True,
                   help="RUN_DIR: checkpoint.pt and metrics.csv go here (--checkpoint, as the authors' scripts)")
    t.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt (bit-exact on one device)")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None, metavar="NAME",
                   help="the authors' published settings (see `reptile-fused presets`)")
    _add_data(t)
    h = t.add_argument_group("hyperparameters (the authors' flag names)")
    _add_task_shape(h)
    h.add_argument("--train-shots", type=int, default=None, help="examples per class in a training task (0: --shots)")
    h.add_argument("--inner-batch", type=int, default=None, help="inner-loop batch size")
    h.add_argument("--inner-iters", type=int, default=None, help="inner-loop iterations per task")
    h.add_argument("--learning-rate", "--inner-lr", dest="learning_rate", type=float, default=None,
                   help="inner-loop step size")
    h.add_argument("--meta-step", type=float, default=None, help="meta step size (interpolation coefficient)")
    h.add_argument("--meta-step-final", type=float, default=None,
                   help="meta step size at the end, annealed linearly (default: --meta-step, no annealing)")
    h.add_argument("--meta-batch", type=int, default=None, help="tasks per meta step")
    h.add_argument("--meta-iters", type=int, default=None, help="meta-training iterations")
    h.add_argument("--eval-interval", type=int, default=None, help="iterations between logged evaluations")
    _add_eval_protocol(h)
    h.add_argument("--inner-optimizer", choices=["adam", "sgd"], default=None,
                   help="inner optimizer (default adam with beta1 = 0, as the authors; sine: sgd)")
    h.add_argument("--sgd", dest="inner_optimizer", action="store_const", const="sgd",
                   help="same as --inner-optimizer sgd (the authors' flag)")
    h.add_argument("--adam-beta1", type=float, default=None, help="Adam beta1 (default 0, as the authors)")
    h.add_argument("--adam-beta2", type=float, default=None, help="Adam beta2 (default 0.999)")
    h.add_argument("--foml", action="store_true", default=None,
                   help="first-order MAML instead of Reptile: meta-step along each task's last inner update "
                        "(the authors' flag: only the final gradient is used)")
    h.add_argument("--foml-tail", type=int, default=None, metavar="N",
                   help="with --foml: hold out N examples per class of each training task (sine: N points) as the "
                        "last inner mini-batch; the other inner-iters - 1 batches come from the rest")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard event files into RUN_DIR "
                        "(needs tensorboard: pip install 'reptile-fused[tensorboard]')")
    t.add_argument("--checkpoint-interval", type=int, default=None,
                   help="iterations between checkpoints (default 1000; one is always written at the end)")
    _add_runtime(t)

    pl = sub.add_parser("plot", help="draw one or several runs' metrics.csv on one chart",
                        description="Loss and evaluation scores against meta-iterations of each RUN_DIR's "
                                    "metrics.csv on one chart (e.g. Reptile against FOMAML).")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or their metrics.csv)")
    pl.add_argument("--out", required=True, help="the image to write (.png, .pdf, .svg, ...)")

    e = sub.add_parser("eval", help="the authors' evaluation protocol on a checkpoint",
                       description="Adapt to --eval-samples new tasks from the checkpoint's weights and report "
                                   "the mean accuracy (sine: MSE) with a 95% confidence interval.")
    e.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt (or RUN_DIR)")
    _add_data(e)
    g = e.add_argument_group("protocol (defaults: the checkpoint's training settings)")
    _add_task_shape(g)
    _add_eval_protocol(g)
    g.add_argument("--eval-samples", type=int, default=10000, help="tasks to average over (default %(default)s)")
    g.add_argument("--eval-split", choices=["train", "val", "test"], default="test",
                   help="which classes to draw tasks from (default test)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    _add_runtime(e, seed_default=0)

    sub.add_parser("presets", help="list the presets and the paper's accuracy for each")
    return parser


# ---------------------------------------------------------------------- commands


_CONFIG_FLAGS = [
    "dataset", "data_root", "classes", "shots", "train_shots", "inner_batch", "inner_iters", "learning_rate",
    "meta_step", "meta_step_final", "meta_batch", "meta_iters", "eval_batch", "eval_iters", "eval_interval",
    "transductive", "inner_optimizer", "adam_beta1", "adam_beta2", "seed", "checkpoint_interval", "split",
    "split_seed", "image_size", "channels", "model", "train_fraction", "foml", "foml_tail",
]


def _device(name):
    from .train import default_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check_backend(name: str, device: torch.device) -> None:
    """Refuse a --backend that cannot run on the device now, before any work."""
    if name == "auto":
        return
    reason = backends.unavailable_reason(name, device)
    if reason is None:
        return
    if name == "triton" and device.type == "cpu":
        where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"--device is {device}"
        raise CLIError(f"--backend triton runs on CUDA devices and {where}: use --backend auto, cpp or reference")
    raise CLIError(f"--backend {name} cannot run on {device}: {reason}")


class _StopOnSignal:
    """First Ctrl-C: finish the current iteration, write a checkpoint, stop. Second: abort."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.trainer.stop_requested = True
        print("\nStopping after this iteration (Ctrl-C again to abort without a checkpoint) ...", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def cmd_train(args) -> int:
    from ..distributed import init_from_environment

    device = _device(args.device)
    _check_backend(args.backend, device)
    _eval_batch_tasks(args, device)  # refuse a bad --eval-batch-tasks before any work
    _check_eval_cuda_graph(args, device)
    if args.tensorboard:
        _check_tensorboard()
    # Under torchrun (WORLD_SIZE > 1) each process joins the group and takes its own GPU.
    if not init_from_environment(device.type):
        return _train(args, device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.get_rank() != 0:
        args.quiet = True
    try:
        with contextlib.redirect_stdout(io.StringIO()) if dist.get_rank() != 0 else contextlib.nullcontext():
            status = _train(args, device)
        # Rank 0 still writes the last checkpoint while the others are done: a rank that
        # tears the group down first can abort its peer's gloo threads at exit.  (Should a
        # rank fail instead, torchrun stops the others, so nobody waits here forever.)
        dist.barrier()
        return status
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _locked_run_dir(run_dir: Path):
    """Create RUN_DIR and hold an exclusive lock on it while the run lasts (rank 0 only:
    the other ranks of a distributed run write nothing there)."""
    from ..distributed import rank_and_world

    if rank_and_world()[0] != 0:
        yield
        return
    lock = RunLock(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except RunLockedError as exc:
        raise CLIError(f"--out {run_dir}: another run is writing into this folder ({exc}); "
                       "wait for it to end or choose another --out") from None
    except OSError as exc:
        raise CLIError(f"--out {run_dir}: cannot write there ({_reason(exc)})") from None
    try:
        yield
    finally:
        lock.release()
        if created:  # a run refused before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # fails, as it should, unless the folder is empty


def _train(args, device) -> int:
    from .train import CHECKPOINT_NAME

    run_dir = Path(args.out)
    if args.resume:
        if args.preset is not None:
            raise CLIError("--resume takes the run's settings from its checkpoint; drop --preset")
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise CLIError(f"{run_dir / CHECKPOINT_NAME}: no checkpoint to resume")
    with _locked_run_dir(run_dir):
        return _train_locked(args, device, run_dir)


def _train_locked(args, device, run_dir: Path) -> int:
    from .train import CHECKPOINT_NAME, Trainer, resume

    explicit = {k: getattr(args, k) for k in _CONFIG_FLAGS}
    if args.resume:
        trainer = resume(run_dir, device=device, backend=args.backend, overrides=explicit, progress=not args.quiet,
                         memory_format=_memory_format(args), eval_batch_tasks=_eval_batch_tasks(args, device),
                         notice=_notice, tensorboard=args.tensorboard, eval_cuda_graph=args.eval_cuda_graph)
        c = trainer.config
        print(f"Resuming {run_dir} at iteration {trainer.iteration:,} of {c.meta_iters:,}"
              + (f" (extended from {trainer.extended_from:,}; meta step {c.meta_step_at(trainer.iteration):.4g} now, "
                 f"annealed to {c.final_meta_step:.4g} at {c.meta_iters:,})" if trainer.extended_from else ""))
    else:
        if (run_dir / CHECKPOINT_NAME).exists():
            raise CLIError(f"{run_dir / CHECKPOINT_NAME} exists: pass --resume to continue it, or choose another --out")
        try:
            config = resolve(explicit, args.preset)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        trainer = Trainer(config, device=device, backend=args.backend, run_dir=run_dir, progress=not args.quiet,
                          memory_format=_memory_format(args), eval_batch_tasks=_eval_batch_tasks(args, device),
                          notice=_notice, tensorboard=args.tensorboard, eval_cuda_graph=args.eval_cuda_graph)
        c = config
        what = (f"sine waves ({c.effective_train_shots} points per training task, {c.shots}-shot evaluation)"
                if c.dataset == "sine" else
                f"{c.dataset} {c.classes}-way {c.shots}-shot (train shots {c.effective_train_shots})")
        if c.foml:
            what += ", first-order MAML" + (f" (last batch: a held-out tail of {c.foml_tail})" if c.foml_tail else "")
        print(f"Training {what} for {c.meta_iters:,} iterations on {trainer.device}, "
              f"backend {trainer.opt.backends[0]}; run dir {run_dir}")
    with _StopOnSignal(trainer):
        trainer.run()
    if trainer.iteration < trainer.config.meta_iters:
        print(f"Stopped at iteration {trainer.iteration:,}; checkpoint written. Continue with:\n"
              f"  reptile-fused train --out {run_dir} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    c = trainer.config
    print(f"Done: {c.meta_iters:,} iterations in {trainer.elapsed:.1f} s. Checkpoint: {trainer.checkpoint_path}")
    print(f"Evaluate with: reptile-fused eval --checkpoint {trainer.checkpoint_path}"
          + (f" --data-root {c.data_root}" if c.data_root else "") + (" --transductive" if c.transductive else ""))
    return 0


def _eval_batch_tasks(args, device) -> int:
    from .evaluate import default_eval_batch_tasks

    n = args.eval_batch_tasks
    if n is None:
        return default_eval_batch_tasks(device)
    if n < 1:
        raise CLIError(f"--eval-batch-tasks must be >= 1, got {n}")
    return n


def _check_eval_cuda_graph(args, device) -> None:
    """What can be refused before any work (the backend is checked once the optimizer exists)."""
    if not args.eval_cuda_graph:
        return
    if device.type != "cuda":
        raise CLIError(f"--eval-cuda-graph needs a CUDA device, got {device}")
    n = _eval_batch_tasks(args, device)
    if n < 2:
        raise CLIError(f"--eval-cuda-graph records the batched adaptation: it needs --eval-batch-tasks of 2 or more, "
                       f"got {n}")


def _check_tensorboard() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise CLIError("--tensorboard needs the tensorboard package: pip install 'reptile-fused[tensorboard]'") from None


def _notice(line: str) -> None:
    print(line, file=sys.stderr)


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from ..models import build_model
    from .problems import build_problem
    from .train import CHECKPOINT_NAME, make_optimizer

    device = _device(args.device)
    _check_backend(args.backend, device)
    _check_eval_cuda_graph(args, device)
    if args.json:
        _check_output(args.json, "--json")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        ckpt = ckpt_io.load(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    settings = dict(ckpt["config"])
    for key in ("dataset", "data_root", "classes", "shots", "eval_batch", "eval_iters", "transductive", "split",
                "split_seed", "image_size", "channels", "train_fraction"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if settings["dataset"] != ckpt["config"]["dataset"] and "sine" in (settings["dataset"], ckpt["config"]["dataset"]):
        raise CLIError(f"the checkpoint was trained on {ckpt['config']['dataset']}, not {settings['dataset']}")
    config = TrainConfig.from_dict(settings)
    try:
        config.validate()
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    spec = dict(ckpt["model_spec"])
    if "num_classes" in spec and spec["num_classes"] != config.classes:
        raise CLIError(f"the checkpoint's model has {spec['num_classes']} outputs; it cannot do "
                       f"{config.classes}-way tasks (pass --classes {spec['num_classes']})")
    split = "test" if config.dataset == "sine" else args.eval_split
    problem, data_spec = build_problem(config, device, eval_only=split)
    if data_spec != spec:
        raise CLIError(f"the data gives model {data_spec}, the checkpoint holds {spec}: "
                       "check --image-size/--channels and the dataset")
    model = build_model(spec).to(device)
    model.load_state_dict(ckpt["model"])
    opt = make_optimizer(model, config, args.backend, _memory_format(args))
    # The inner optimizer's trained state (Adam moments) adapts at test time too, as in the authors' code.
    opt.load_state_dict(ckpt["optimizer"])
    generator = torch.Generator().manual_seed(args.seed)
    batch_tasks = _eval_batch_tasks(args, device)
    result = evaluate(model, opt, problem, split, args.eval_samples, config.eval_batch, config.eval_iters,
                      config.transductive, generator, progress=not args.quiet, batch_tasks=batch_tasks,
                      notice=_notice, cuda_graph=args.eval_cuda_graph)
    metric = problem.metric
    value, ci = result[metric], result["ci95"]
    key = "accuracy" if metric == "acc" else "mse"
    out = {
        key: value,
        "ci95": ci,
        "tasks": result["tasks"],
        "settings": {
            "checkpoint": str(path), "iteration": int(ckpt["iteration"]), "dataset": config.dataset,
            "data_root": config.data_root, "split": split, "classes": config.classes, "shots": config.shots,
            "eval_batch": config.eval_batch, "eval_iters": config.eval_iters, "transductive": config.transductive,
            "learning_rate": config.learning_rate, "inner_optimizer": config.inner_optimizer,
            "seed": args.seed, "device": str(device), "backend": opt.backends[0],
            "eval_batch_tasks": result["batch_tasks"], "eval_cuda_graph": result["cuda_graph"],
        },
    }
    ci_text = "n/a" if ci is None else (f"{100 * ci:.2f}" if key == "accuracy" else f"{ci:.4f}")
    mode = "transductive" if config.transductive else "non-transductive"
    if key == "accuracy":
        print(f"{config.dataset} {config.classes}-way {config.shots}-shot ({mode}, {split} split): "
              f"accuracy {100 * value:.2f}% ± {ci_text}% (95% CI, {result['tasks']:,} tasks)")
    else:
        print(f"sine {config.shots}-shot: MSE {value:.4f} ± {ci_text} (95% CI, {result['tasks']:,} tasks)")
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        except OSError as exc:
            raise CLIError(f"--json {args.json}: cannot write there ({_reason(exc)}); the result is printed above") from None
        print(f"Wrote {args.json}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DEFAULT_ITERS, figure_path, run_demo

    iters = DEFAULT_ITERS if args.iters is None else args.iters
    if iters < 1 or args.test_tasks < 2:
        raise CLIError("--iters must be >= 1 and --test-tasks >= 2")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CLIError("the demo draws with matplotlib: pip install 'reptile-fused[demo]'") from exc
    device = _device(args.device)
    _check_backend(args.backend, device)
    out = _check_output(figure_path(args.out), "--out")
    try:
        run_demo(out=out, iterations=iters, seed=args.seed, device=device, backend=args.backend,
                 test_tasks=args.test_tasks, progress=not args.quiet)
    except OSError as exc:  # the folder changed under us while training: the numbers are printed already
        raise CLIError(f"--out {out}: cannot write the figure ({_reason(exc)})") from None
    return 0


def cmd_plot(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CLIError("plot draws with matplotlib: pip install 'reptile-fused[demo]'") from exc
    from .curves import CurvesError, plot_runs
    from .demo import figure_path

    out = _check_output(figure_path(args.out), "--out")
    try:
        plot_runs(args.runs, out)
    except CurvesError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write the chart ({_reason(exc)})") from None
    print(f"Wrote {out} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0


def cmd_presets(args) -> int:
    print(f"{'preset':40s} {'dataset':13s} {'paper accuracy':>15s}")
    for name, p in PRESETS.items():
        paper = f"{p.paper:.2f}%" if p.paper is not None else "-"
        print(f"{name:40s} {p.dataset:13s} {paper:>15s}" + (f"   ({p.note})" if p.note else ""))
        if name in PAPER_TRANSDUCTIVE:
            print(f"{'  ... evaluated with --transductive':40s} {'':13s} {PAPER_TRANSDUCTIVE[name]:>14.2f}%")
    print(GRADCOMB_NOTE)
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "presets": cmd_presets}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise CLIError("--threads must be >= 1")
            torch.set_num_threads(threads)
        return COMMANDS[args.command](args)
    except (CLIError, DatasetError, BackendUnavailableError) as exc:
        print(f"reptile-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Settings the config or the optimizer rejected: a user error, not a crash.
        print(f"reptile-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
