"""Meta-training with checkpoints that resume bit-exactly.

One iteration is the authors' train step: ``meta_batch`` tasks of
``classes x train_shots`` examples, each adapted for ``inner_iters`` mini-batches of
``inner_batch``, then one meta step whose size is annealed linearly from
``meta_step`` to ``meta_step_final``.  With ``foml`` (first-order MAML, their
``--foml``) the meta step follows each task's last inner update instead of its whole
adaptation, and ``foml_tail`` draws the last mini-batch apart (:func:`task_batches`).  Every ``eval_interval`` iterations one task
per evaluation split is scored with the evaluation protocol and a row is appended to
``RUN_DIR/metrics.csv``.

Everything that decides the future of a run (weights, inner-optimizer state, both
task generators, the iteration, the running loss) is in the checkpoint, so a run
resumed from ``RUN_DIR/checkpoint.pt`` ends with exactly the weights of one that
never stopped (on the same device and backend).

Under ``torchrun`` every rank draws the same meta-batch from the same generator and
adapts its own contiguous share of it (:func:`reptile_fused.distributed.shard`); the
meta step averages over all ranks.  So the tasks do not depend on the world size, and
rank 0 alone evaluates, logs and writes checkpoints, which any world size can resume.
"""

from __future__ import annotations

import csv
import math
import shlex
import time
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint as ckpt_io
from . import metrics as metrics_io
from .config import TrainConfig
from ..data import inner_batches
from ..distributed import rank_and_world, shard
from .evaluate import EvalBatching, Restorer, adapt, check_eval_cuda_graph, draw_task
from ..models import build_model
from ..optimizer import ReptileOptimizer
from .problems import build_problem

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = metrics_io.METRICS_NAME
CURVES_NAME = "curves.png"
# metrics.csv columns -> TensorBoard tags (score columns go under eval/).
TENSORBOARD_TAGS = {"meta_step": "train/meta_step", "loss": "train/loss"}
# Evaluation tasks come from their own generator so that changing --eval-interval
# does not change which training tasks a run sees.
EVAL_SEED_OFFSET = 0x5EED


class RunStopped(RuntimeError):
    """The run stopped before its end for a reason that is not the user's input: it
    diverged, or its files could not be written.  One line, naming the iteration and
    the checkpoint that is kept."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: torch.nn.Module, config: TrainConfig, backend: str = "auto", memory_format=None) -> ReptileOptimizer:
    return ReptileOptimizer(
        model.parameters(),
        inner_optimizer=config.inner_optimizer,
        lr=config.learning_rate,
        meta_lr=config.meta_step,
        betas=(config.adam_beta1, config.adam_beta2) if config.inner_optimizer == "adam" else None,
        backend=backend,
        memory_format=memory_format,
        algorithm="fomaml" if config.foml else "reptile",
    )


def _first_problem(exc: BaseException) -> str:
    """The first specific line of a multi-line error (``load_state_dict``'s list of mismatches)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    return detail.rstrip(".")


def load_weights(model: torch.nn.Module, opt: ReptileOptimizer, ckpt: dict, path) -> None:
    """A checkpoint's weights and inner-optimizer state into ``model`` and ``opt``, or a
    one-line :class:`~reptile_fused.app.checkpoint.CheckpointError` when they do not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ckpt_io.CheckpointError(f"{path}: its weights do not fit the model its settings describe "
                                      f"({_first_problem(exc)}); {ckpt_io.DAMAGED_ADVICE}") from None
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise ckpt_io.CheckpointError(f"{path}: its optimizer state cannot be restored ({_first_problem(exc)}); "
                                      f"{ckpt_io.DAMAGED_ADVICE}") from None


def tail_split(y: Tensor, tail: int, classification: bool) -> tuple[Tensor, Tensor]:
    """The authors' ``--foml-tail`` split of a training task with labels ``y``: indices
    ``(rest, tail)``.  ``tail`` takes ``tail`` examples per class, the first ones of each
    class in the task's order, in their order (round by round: the first of every class,
    then the second, ...).  ``rest`` is everything else, in order.  Regression tasks
    (sine waves) count as one class: the tail is the first ``tail`` points.
    """
    n = y.shape[0]
    if not classification:
        if tail > n:
            raise ValueError(f"--foml-tail {tail}: the task has only {n} points")
        return torch.arange(tail, n), torch.arange(tail)
    y = y.detach().cpu()
    per_class = [torch.nonzero(y == label).flatten() for label in torch.unique(y)]  # sorted labels
    short = [len(idx) for idx in per_class if len(idx) < tail]
    if short:
        raise ValueError(f"--foml-tail {tail}: a class of the task has only {short[0]} examples")
    tail_idx = torch.stack([idx[:tail] for idx in per_class], dim=1).flatten()  # round-major
    keep = torch.ones(n, dtype=torch.bool)
    keep[tail_idx] = False
    return torch.nonzero(keep).flatten(), tail_idx


def task_batches(y: Tensor, config: TrainConfig, classification: bool,
                 generator: torch.Generator) -> Tensor | list[Tensor]:
    """A training task's inner mini-batches (indices into it), as the authors draw them.

    Reptile and FOMAML without ``--foml-tail``: ``inner_iters`` batches of
    ``inner_batch`` drawn from the whole task (``data.inner_batches``).  With
    ``--foml-tail N``: ``inner_iters - 1`` such batches drawn from the task minus its
    tail, then the tail (N per class) alone as the last batch, so the last step's
    examples are never seen before it.
    """
    c = config
    if c.foml_tail is None:
        return inner_batches(y.shape[0], c.inner_batch, c.inner_iters, generator)
    rest, tail = tail_split(y, c.foml_tail, classification)
    if c.inner_iters == 1:
        return [tail]
    earlier = rest[inner_batches(rest.shape[0], c.inner_batch, c.inner_iters - 1, generator)]
    return [*earlier, tail]


def init_model(spec: dict, seed: int, device) -> torch.nn.Module:
    """The model with weights drawn on the CPU from ``seed`` (same init on every device),
    leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    return model.to(device)


class Trainer:
    """A run: model, optimizer, task source and the state needed to resume it."""

    def __init__(self, config: TrainConfig, device=None, backend: str = "auto", run_dir=None,
                 problem=None, spec=None, progress: bool = True, memory_format=None, eval_batch_tasks: int = 1,
                 notice=None, curves: bool = True, tensorboard: bool = False, eval_cuda_graph: bool = False):
        """``eval_batch_tasks`` > 1: the periodic evaluation adapts its tasks (one per
        evaluation split) at once under vmap (same tasks, same draws); ``notice`` gets the
        one-line reason when that does not apply; ``eval_cuda_graph``: that adaptation is
        recorded once as a CUDA graph and replayed (refused here when it cannot be).
        ``curves``: keep ``RUN_DIR/curves.png`` up to date (needs matplotlib; skipped with
        a notice without it).  ``tensorboard``: also write the metrics as TensorBoard
        event files into ``RUN_DIR``."""
        config.validate()
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.backend = backend
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank, self.world_size = rank_and_world()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        if problem is None:
            problem, spec = build_problem(config, self.device)
        self.problem = problem
        self.spec = spec
        self.model = init_model(spec, config.seed, self.device)
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.opt = make_optimizer(self.model, config, backend, memory_format)
        self.train_gen = torch.Generator().manual_seed(config.seed)
        self.eval_gen = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
        self.iteration = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.elapsed = 0.0
        self.stop_requested = False
        self.extended_from = None  # set by resume(): the meta_iters a resumed run was extended from
        if not isinstance(eval_batch_tasks, int) or eval_batch_tasks < 1:
            raise ValueError(f"--eval-batch-tasks must be >= 1, got {eval_batch_tasks}")
        self.eval_batch_tasks = eval_batch_tasks
        if eval_cuda_graph:
            check_eval_cuda_graph(self.opt, eval_batch_tasks)
        self.eval_cuda_graph = eval_cuda_graph
        self.notice = notice
        self._batching: EvalBatching | None = None
        self._told_batching = False
        self.curves = curves
        self.tensorboard = tensorboard
        self._curves_drawn_at: float | None = None  # perf_counter of the last curves.png
        self._curves_cost = 0.0  # seconds spent drawing it
        self._writer = None
        # Each iteration's summed loss (device tensors) since the last finiteness check.
        self._losses: list[tuple[int, Tensor]] = []
        self.saved_iteration: int | None = None  # the iteration of the checkpoint on disk, if any
        self._fingerprint = None

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT_NAME

    @property
    def metrics_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / METRICS_NAME

    def state(self) -> dict:
        return {
            "format": ckpt_io.FORMAT,
            "version": ckpt_io.VERSION,
            "config": self.config.to_dict(),
            "model_spec": dict(self.spec),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "iteration": self.iteration,
            "rng": {"train": self.train_gen.get_state(), "eval": self.eval_gen.get_state()},
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "elapsed_s": self.elapsed,
            "device": str(self.device),
            "backend": self.opt.backends[0] if self.opt.backends else self.backend,
            "data": self.data_fingerprint(),
        }

    def data_fingerprint(self) -> dict | None:
        """What the run trains on, to recognise the same data in another folder (see resume())."""
        if self._fingerprint is None:
            self._fingerprint = self.problem.fingerprint() if hasattr(self.problem, "fingerprint") else None
        return self._fingerprint

    def kept(self) -> str:
        """What is on disk for the run to continue from, in words."""
        if self.checkpoint_path is None:
            return "no checkpoint is written without a run folder"
        if self.saved_iteration is None:
            return f"no checkpoint was written yet (none at {self.checkpoint_path})"
        return f"{self.checkpoint_path} of iteration {self.saved_iteration:,} is kept as it was"

    def check_finite(self, iteration: int) -> None:
        """``RunStopped`` when a training loss since the last check, or the meta-weights
        after ``iteration``'s meta step, are not finite (nothing is written then)."""
        window, self._losses = self._losses, []
        if window:
            values = torch.stack([loss.float() for _, loss in window])
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                raise RunStopped(
                    f"iteration {window[k][0]:,}: the training loss is {float(values[k])}: the run diverged; "
                    f"stopped without writing a checkpoint, {self.kept()}. Start a new run with a smaller "
                    "--learning-rate (or --meta-step)"
                )
        for b in self.opt.flat_buffers:
            if not bool(torch.isfinite(b.data).all()):
                raise RunStopped(
                    f"iteration {iteration:,}: the meta-weights hold nan or inf after its meta step: the run diverged; "
                    f"stopped without writing a checkpoint, {self.kept()}. Start a new run with a smaller "
                    "--meta-step (or --learning-rate)"
                )

    def save(self) -> None:
        """Write the checkpoint (after checking the run is finite; see check_finite)."""
        self.check_finite(self.iteration - 1)
        if self.checkpoint_path is not None and self.is_main:
            try:
                ckpt_io.save_atomic(self.state(), self.checkpoint_path)
            except ckpt_io.CheckpointWriteError as exc:
                raise RunStopped(f"iteration {self.iteration - 1:,}: {exc}; {self.kept()}. Make room, then continue "
                                 f"with: reptile-fused train --out {shlex.quote(str(self.run_dir))} --resume") from None
            self.saved_iteration = self.iteration

    def load_state(self, ckpt: dict, path=None) -> None:
        """Continue from a checkpoint of this same config (``path``: its file, for messages)."""
        load_weights(self.model, self.opt, ckpt, path or self.checkpoint_path)
        self.saved_iteration = int(ckpt["iteration"])
        self.train_gen.set_state(ckpt["rng"]["train"])
        self.eval_gen.set_state(ckpt["rng"]["eval"])
        self.iteration = int(ckpt["iteration"])
        self.loss_sum = float(ckpt["loss_sum"])
        self.loss_count = int(ckpt["loss_count"])
        self.elapsed = float(ckpt["elapsed_s"])

    # ------------------------------------------------------------------ metrics

    def metric_columns(self) -> list[str]:
        p = self.problem
        return ["iteration", "meta_step", "loss"] + [f"{s}_{p.metric}" for s in p.eval_splits] + ["wall_s"]

    def _prepare_csv(self) -> None:
        """Create the CSV, or on resume drop the rows written after the checkpoint (and
        any row that is not whole, with a notice).  A new run never discards the rows of
        an earlier one: a metrics.csv it finds (an earlier run stopped before its first
        checkpoint) is renamed to ``metrics.earlier-N.csv`` first, with a notice."""
        path = self.metrics_path
        if path is None or not self.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = self.metric_columns()
        kept: list[list[str]] = []
        if self.iteration > 0 and path.exists():
            kept, note = metrics_io.rows_to_keep(path, columns, self.iteration)
            if note and self.notice is not None:
                self.notice(note)
        elif self.iteration == 0 and metrics_io.has_rows(path):
            moved = metrics_io.set_aside(path)
            if self.notice is not None:
                self.notice(f"note: {path} held the rows of an earlier run (which left no checkpoint to resume); "
                            f"moved them to {moved}")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(kept)

    def _append_row(self, row: dict) -> None:
        if self.metrics_path is None or not self.is_main:
            return
        try:
            with open(self.metrics_path, "a", newline="") as f:
                csv.DictWriter(f, self.metric_columns()).writerow(row)
        except OSError as exc:
            raise RunStopped(f"iteration {row['iteration']:,}: cannot append to {self.metrics_path} "
                             f"({exc.strerror or exc}); {self.kept()}. Make room, then continue with: "
                             f"reptile-fused train --out {shlex.quote(str(self.run_dir))} --resume") from None
        if self._writer is not None:
            step = int(row["iteration"])
            for key in self.metric_columns()[1:]:
                if key != "wall_s" and row.get(key) not in (None, ""):
                    self._writer.add_scalar(TENSORBOARD_TAGS.get(key, f"eval/{key}"), float(row[key]), step)
            self._writer.flush()
        self.refresh_curves()

    def refresh_curves(self, force: bool = False) -> None:
        """Redraw ``RUN_DIR/curves.png`` from metrics.csv.  At every evaluation, except that
        drawing (about 0.2 s) may take at most 5 % of the run's time: with frequent
        evaluations of a fast run it is redrawn less often, and always at the end."""
        if not self.curves or self.run_dir is None or not self.is_main:
            return
        now = time.perf_counter()
        if not force and self._curves_drawn_at is not None and self._curves_cost > 0.05 * (now - self._curves_started):
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.curves = False
            if self.notice is not None:
                self.notice(f"note: no {CURVES_NAME} (it is drawn with matplotlib: pip install 'reptile-fused[demo]')")
            return
        from .curves import plot_run

        try:
            plot_run(self.run_dir)
        except metrics_io.MetricsError:  # no evaluation row yet (the chart is a convenience)
            return
        except OSError as exc:  # a full disk, say: the run goes on without its chart
            self.curves = False
            if self.notice is not None:
                self.notice(f"note: no more {CURVES_NAME}: cannot write it ({exc.strerror or exc})")
            return
        self._curves_drawn_at = time.perf_counter()
        self._curves_cost += self._curves_drawn_at - now

    def _open_writer(self) -> None:
        if not self.tensorboard or self.run_dir is None or not self.is_main or self._writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events written after its checkpoint, as metrics.csv does.
        self._writer = SummaryWriter(str(self.run_dir), purge_step=self.iteration if self.iteration else None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ training

    def train_iteration(self):
        """One meta-iteration; returns the summed inner loss (device tensor) and the step count."""
        c = self.config
        meta_lr = c.meta_step_at(self.iteration)
        for group in self.opt.param_groups:
            group["meta_lr"] = meta_lr
        total, steps = None, 0
        # Every rank draws the whole meta-batch, and a seed per task for its inner
        # mini-batches, from the same generator: the tasks and the generator state
        # are the same whatever the world size; each rank adapts its own share.
        tasks = [self.problem.train_task(self.train_gen) for _ in range(c.meta_batch)]
        seeds = torch.randint(0, 2**62, (c.meta_batch,), generator=self.train_gen).tolist()
        for t in shard(range(c.meta_batch), self.rank, self.world_size):
            x, y = tasks[t]
            generator = torch.Generator().manual_seed(seeds[t])
            # Without --foml-tail adapt() draws the batches itself (the same draws).
            order = (task_batches(y, c, self.problem.kind == "classification", generator)
                     if c.foml_tail is not None else None)
            with self.opt.task():
                loss = adapt(self.model, self.opt, self.problem.loss, x, y, c.inner_batch, c.inner_iters,
                             generator, order)
            if loss is not None:
                total = loss if total is None else total + loss
                steps += c.inner_iters
        self.opt.meta_step()
        return total, steps, meta_lr

    def evaluate_now(self) -> dict[str, float]:
        """One task per evaluation split, drawn in the split order; adapted together when
        ``eval_batch_tasks`` > 1 (the draws and the scores do not depend on it)."""
        c = self.config
        if self._batching is None:
            self._batching = EvalBatching(self.model, self.opt, self.problem, self.eval_batch_tasks,
                                          self.eval_cuda_graph)
        splits = self.problem.eval_splits
        drawn = [draw_task(self.problem, split, c.eval_batch, c.eval_iters, self.eval_gen) for split in splits]
        scores = []
        for start in range(0, len(drawn), self._batching.batch_tasks):
            scores += self._batching.score(self.model, self.opt, self.problem, drawn[start:start + self._batching.batch_tasks],
                                           c.eval_batch, c.eval_iters, c.transductive, Restorer(self.opt))
        if self._batching.notice and self.notice is not None and not self._told_batching:
            self.notice(self._batching.notice)
            self._told_batching = True  # once per run
        return dict(zip(splits, scores))

    def _iteration_done(self) -> None:
        """Called after every iteration, before its checkpoint (a seam for tests to interrupt a run)."""

    def run(self) -> torch.nn.Module:
        c = self.config
        self.model.train()
        self._prepare_csv()
        self._curves_started = time.perf_counter()
        self._open_writer()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.meta_iters, initial=self.iteration, desc="meta-train", dynamic_ncols=True)
        running: dict[str, float] = {}
        pending = None  # device tensor: summed loss since the last row, read only at rows
        start = time.perf_counter() - self.elapsed
        try:
            while self.iteration < c.meta_iters:
                i = self.iteration
                loss, steps, meta_lr = self.train_iteration()
                if loss is not None:
                    pending = loss if pending is None else pending + loss
                    self.loss_count += steps
                    self._losses.append((i, loss))
                if i % c.eval_interval == 0 and self.is_main:
                    self.check_finite(i)  # before the row: a diverged run logs no nan rows
                    if pending is not None:
                        self.loss_sum += float(pending)
                        pending = None
                    scores = self.evaluate_now()
                    mean_loss = self.loss_sum / self.loss_count if self.loss_count else math.nan
                    self.elapsed = time.perf_counter() - start
                    row = {"iteration": i, "meta_step": f"{meta_lr:.6g}", "loss": f"{mean_loss:.6g}",
                           "wall_s": f"{self.elapsed:.2f}"}
                    row.update({f"{s}_{self.problem.metric}": f"{v:.6g}" for s, v in scores.items()})
                    self._append_row(row)
                    self.loss_sum, self.loss_count = 0.0, 0
                    named = [(f"{s}_{self.problem.metric}", v) for s, v in scores.items()]
                    for k, v in [("loss", mean_loss), *named]:
                        if not math.isnan(v):
                            # Smooth over ~20 evaluations: one task's score is very noisy.
                            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
                self.iteration += 1
                if bar is not None:
                    bar.update(1)
                self._iteration_done()
                due = self.iteration % c.checkpoint_interval == 0 or self.iteration == c.meta_iters
                if due or self.stop_requested:
                    if pending is not None:  # the checkpoint carries the running loss exactly
                        self.loss_sum += float(pending)
                        pending = None
                    self.elapsed = time.perf_counter() - start
                    self.save()
                if self.stop_requested:
                    break
        finally:
            if bar is not None:
                bar.close()
            self.close()
        self.refresh_curves(force=True)
        self.elapsed = time.perf_counter() - start
        return self.model


def resume(run_dir, device=None, backend: str = "auto", overrides: dict | None = None, **kwargs) -> Trainer:
    """A trainer continuing ``RUN_DIR/checkpoint.pt``.

    The run's settings come from the checkpoint; ``overrides`` may only change how
    often checkpoints are written, extend the run (a larger ``meta_iters``), or read the
    same data from another folder (``data_root``: refused unless the images there are
    the run's, by the checkpoint's fingerprint of its data), since anything else would
    change the run's result.
    An extended run anneals the meta step linearly over the new ``meta_iters``, from
    the iteration it resumes at: the step of iteration ``i`` is the one a run started
    with the new ``meta_iters`` would take there.  ``trainer.extended_from`` is the
    checkpoint's ``meta_iters`` when the run was extended, else ``None``.
    """
    run_dir = Path(run_dir)
    ckpt = ckpt_io.load(run_dir / CHECKPOINT_NAME)
    settings = dict(ckpt["config"])
    extended_from = None
    moved_from = None
    for key, value in (overrides or {}).items():
        if value is None or settings.get(key) == value:
            continue
        if key == "meta_iters":
            if value < settings["meta_iters"]:
                raise ValueError(
                    f"--meta-iters {value} is below the checkpoint's {settings['meta_iters']}; "
                    "a resumed run can be extended, not shortened"
                )
            extended_from = settings["meta_iters"]
        elif key == "data_root" and settings["dataset"] != "sine":
            moved_from = settings["data_root"]
        elif key != "checkpoint_interval":
            raise ValueError(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {settings.get(key)}; "
                "a resumed run keeps its settings (start a new run to change them)"
            )
        settings[key] = value
    config = TrainConfig.from_dict(settings)
    trainer = Trainer(config, device=device, backend=backend, run_dir=run_dir, **kwargs)
    if moved_from is not None:
        saved = ckpt.get("data")
        if saved is None or trainer.data_fingerprint() != saved:
            why = ("the checkpoint holds no fingerprint of its data to compare with" if saved is None else
                   "the images there are not the ones the run trained on")
            raise ValueError(f"--data-root {config.data_root} differs from the checkpoint's {moved_from} and {why}; "
                             "a resumed run keeps its data: drop --data-root, or start a new run on the other data")
        if trainer.notice is not None:
            trainer.notice(f"note: reading the run's data from {config.data_root} (the same images as in {moved_from})")
    if dict(trainer.spec) != dict(ckpt["model_spec"]):
        raise ValueError(f"the data gives model {trainer.spec}, the checkpoint holds {ckpt['model_spec']}")
    trainer.load_state(ckpt, run_dir / CHECKPOINT_NAME)
    trainer.extended_from = extended_from
    return trainer


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj
