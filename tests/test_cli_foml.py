"""First-order MAML in the command line: --foml, --foml-tail, the gradcomb-* presets and the
gradient-combination study script (issue 15, section 1).

Runs use the reference backend and sine waves (or a tiny generated Omniglot) for a few
iterations: the whole file takes seconds on one CPU core.
"""

import csv
import importlib.util
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from fewshot_fixtures import make_omniglot, one_thread  # noqa: F401
from reptile_fused.app import checkpoint as ckpt_io
from reptile_fused.app import train as train_mod
from reptile_fused.app.cli import _CONFIG_FLAGS, build_parser, main
from reptile_fused.app.config import GRADCOMB, PRESETS, resolve
from reptile_fused.app.train import Trainer, tail_split, task_batches
from reptile_fused.data import inner_batches

REPO = Path(__file__).resolve().parents[1]
SINE = ["--dataset", "sine", "--backend", "reference", "--quiet"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reptile-fused train: error: "), err
    return lines[0]


# ---------------------------------------------------------------------- the tail split


def test_tail_split_takes_the_first_n_of_each_class_round_by_round():
    # A task as TaskSampler lays it out (class-major), and a shuffled one.
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    rest, tail = tail_split(y, 2, classification=True)
    assert tail.tolist() == [0, 4, 8, 1, 5, 9], "the authors' order: first of every class, then the second"
    assert rest.tolist() == [2, 3, 6, 7, 10, 11]
    y = torch.tensor([2, 1, 0, 0, 2, 1, 1, 0, 2])
    rest, tail = tail_split(y, 1, classification=True)
    assert tail.tolist() == [2, 1, 0] and sorted(rest.tolist() + tail.tolist()) == list(range(9))
    # Regression (sine): one class, the first N points.
    rest, tail = tail_split(torch.randn(7, 1), 3, classification=False)
    assert tail.tolist() == [0, 1, 2] and rest.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("inner_iters", [1, 2, 4])
def test_task_batches_with_a_tail(inner_iters):
    """The last batch is exactly the tail (N per class); the earlier ones come from the rest only."""
    c = resolve({"dataset": "omniglot", "data_root": "x", "classes": 3, "train_shots": 5, "inner_batch": 4,
                 "inner_iters": inner_iters, "foml": True, "foml_tail": 2})
    y = torch.arange(3).repeat_interleave(5)
    batches = task_batches(y, c, True, torch.Generator().manual_seed(0))
    assert len(batches) == inner_iters
    last = batches[-1]
    assert last.tolist() == tail_split(y, 2, True)[1].tolist()
    assert torch.bincount(y[last], minlength=3).tolist() == [2, 2, 2]
    earlier = torch.cat(list(batches[:-1])) if inner_iters > 1 else torch.zeros(0, dtype=torch.long)
    assert all(b.numel() == 4 for b in batches[:-1])
    assert not set(earlier.tolist()) & set(last.tolist()), "the tail never overlaps the earlier batches"
    # Drawn as inner_batches draws from the rest (the authors' _mini_batches over `train`).
    if inner_iters > 1:
        rest = tail_split(y, 2, True)[0]
        expected = rest[inner_batches(len(rest), 4, inner_iters - 1, torch.Generator().manual_seed(0))]
        assert torch.equal(torch.stack(list(batches[:-1])), expected)


def test_without_a_tail_fomaml_draws_the_batches_reptile_draws(monkeypatch):
    """--foml alone changes the meta step only: the training tasks and inner batches are Reptile's."""
    seen = {}
    real = train_mod.adapt
    for algo, extra in (("reptile", {}), ("fomaml", {"foml": True})):
        c = resolve({"dataset": "sine", "meta_iters": 3, "inner_iters": 3, **extra})
        trainer = Trainer(c, backend="reference", progress=False, curves=False)
        assert trainer.opt.algorithm == algo
        calls = []

        def spy(model, opt, loss_fn, x, y, batch, iters, generator, order=None):
            state = generator.get_state()
            drawn = inner_batches(x.shape[0], batch, iters, generator) if order is None else order
            generator.set_state(state)
            calls.append((x.clone(), torch.stack(list(drawn))))
            return real(model, opt, loss_fn, x, y, batch, iters, generator, order)

        monkeypatch.setattr(train_mod, "adapt", spy)
        for _ in range(3):
            trainer.train_iteration()
        seen[algo] = calls
    for (xr, br), (xf, bf) in zip(seen["reptile"], seen["fomaml"]):
        assert torch.equal(xr, xf) and torch.equal(br, bf)


def test_a_tail_run_adapts_on_the_tail_last(monkeypatch):
    """End to end on sine: every task's last inner batch is its first N points, the others never hold them."""
    c = resolve({"dataset": "sine", "meta_iters": 2, "inner_iters": 3, "train_shots": 12, "inner_batch": 5,
                 "foml": True, "foml_tail": 4})
    trainer = Trainer(c, backend="reference", progress=False, curves=False)
    orders = []
    real = train_mod.adapt

    def spy(model, opt, loss_fn, x, y, batch, iters, generator, order=None):
        orders.append(order)
        return real(model, opt, loss_fn, x, y, batch, iters, generator, order)

    monkeypatch.setattr(train_mod, "adapt", spy)
    trainer.train_iteration()
    (order,) = orders
    assert [b.numel() for b in order] == [5, 5, 4]
    assert order[-1].tolist() == [0, 1, 2, 3]
    assert all(i >= 4 for b in order[:-1] for i in b.tolist())


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("flags, message", [
    (["--foml-tail", "2"], "--foml-tail only applies with --foml"),
    (["--foml", "--foml-tail", "0"], "--foml-tail must be >= 1, got 0"),
    (["--foml", "--foml-tail", "50"], "--foml-tail 50 holds out 50 of the task's 50 points (--train-shots)"),
    (["--foml", "--foml-tail", "51", "--inner-iters", "1"], "--foml-tail 51 is more than the task's 50 points"),
    (["--foml", "--inner-iters", "0"], "--foml needs --inner-iters >= 1"),
])
def test_impossible_foml_settings_are_one_line(flags, message, tmp_path, capsys):
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists(), "nothing written"


def test_tail_errors_name_examples_per_class_for_images():
    with pytest.raises(ValueError, match=r"holds out 5 of the task's 5 examples per class .* need --foml-tail < 5"):
        resolve({"dataset": "omniglot", "data_root": "x", "foml": True, "foml_tail": 5, "inner_iters": 2})
    # One inner step: the tail may be the whole task.
    assert resolve({"dataset": "omniglot", "data_root": "x", "foml": True, "foml_tail": 5, "inner_iters": 1})


# ---------------------------------------------------------------------- the authors' commands and the presets

SHARED = ("--sgd --seed 0 --inner-batch 25 --learning-rate 0.0003 --meta-step-final 0 --meta-iters 40000 "
          "--eval-batch 25 --eval-iters 5 --eval-interval 1")
AUTHORS = {  # their README, "Comparing different inner-loop gradient combinations"
    "g1": "--inner-iters 1 --train-shots 5 --meta-step 0.25 --checkpoint g1_ckpt",
    "g1-g2": "--inner-iters 2 --train-shots 10 --meta-step 0.25 --checkpoint g1_g2_ckpt",
    "half-g1-g2": "--inner-iters 2 --train-shots 10 --meta-step 0.125 --checkpoint half_g1_g2_ckpt",
    "g2": "--foml --inner-iters 2 --train-shots 10 --meta-step 0.25 --checkpoint g2_ckpt",
    "g1-g2-g3": "--inner-iters 3 --train-shots 15 --meta-step 0.25 --checkpoint g1_g2_g3_ckpt",
    "third-g1-g2-g3": "--inner-iters 3 --train-shots 15 --meta-step 0.08325 --checkpoint third_g1_g2_g3_ckpt",
    "g3": "--foml --inner-iters 3 --train-shots 15 --meta-step 0.25 --checkpoint g3_ckpt",
    "g4": "--foml --inner-iters 4 --train-shots 20 --meta-step 0.25 --checkpoint g4_ckpt",
    "g1-g2-g3-g4": "--inner-iters 4 --train-shots 20 --meta-step 0.25 --checkpoint g1_g2_g3_g4_ckpt",
    "fourth-g1-g2-g3-g4": "--inner-iters 4 --train-shots 20 --meta-step 0.0625 --checkpoint fourth_g1_g2_g3_g4_ckpt",
}


@pytest.mark.parametrize("name", list(AUTHORS))
def test_parser_accepts_the_authors_command_and_the_preset_matches_it(name):
    """Their command line as written (plus our --dataset and --data-root) parses, and the
    preset holds the same settings except the SGD learning rate, scaled for our mean loss."""
    args = build_parser().parse_args(["train", "--dataset", "omniglot", "--data-root", "DIR",
                                      *shlex.split(f"{SHARED} {AUTHORS[name]}")])
    assert args.out == f"{name.replace('-', '_')}_ckpt"
    assert args.foml is (True if "--foml" in AUTHORS[name] else None)
    theirs = resolve({k: getattr(args, k) for k in _CONFIG_FLAGS})
    preset = resolve({"data_root": "DIR"}, f"gradcomb-{name}")
    assert theirs.learning_rate == 0.0003 and preset.learning_rate == pytest.approx(0.0003 * 25)
    assert {**theirs.to_dict(), "learning_rate": None} == {**preset.to_dict(), "learning_rate": None}
    assert preset.inner_optimizer == "sgd" and preset.meta_step_final == 0.0 and preset.foml == ("--foml" in AUTHORS[name])
    assert PRESETS[f"gradcomb-{name}"].paper is None and PRESETS[f"gradcomb-{name}"].dataset == "omniglot"


def test_presets_lists_the_gradcomb_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in GRADCOMB:
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"gradcomb-{name} ")]
        assert "omniglot" in line and line.split()[2] == "-"
    assert "gradcomb-g2 " in out and "(g2: FOMAML, 2 inner steps, meta step 0.25)" in out
    assert "0.0003" in out.splitlines()[-1]


# ---------------------------------------------------------------------- checkpoints


SMALL_RUN = [*SINE, "--inner-iters", "3", "--train-shots", "12", "--inner-batch", "4", "--meta-iters", "8",
             "--eval-interval", "3", "--eval-iters", "2", "--checkpoint-interval", "4"]
FOML_RUN = [*SMALL_RUN, "--foml", "--foml-tail", "3"]


def test_foml_run_resumes_bit_exact_and_keeps_its_settings(tmp_path, monkeypatch, capsys):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert main(["train", "--out", str(whole), *FOML_RUN]) == 0
    assert "first-order MAML (last batch: a held-out tail of 3)" in capsys.readouterr().out

    def crash(self):
        if self.iteration == 6:  # after the checkpoint at 4
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "_iteration_done", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(["train", "--out", str(crashed), *FOML_RUN])
    saved = ckpt_io.load(crashed / "checkpoint.pt")
    assert saved["iteration"] == 4 and saved["config"]["foml"] is True and saved["config"]["foml_tail"] == 3
    assert main(["train", "--out", str(crashed), "--resume", "--backend", "reference", "--quiet"]) == 0
    a, b = ckpt_io.load(whole / "checkpoint.pt"), ckpt_io.load(crashed / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    assert strip(_rows(whole / "metrics.csv")) == strip(_rows(crashed / "metrics.csv"))
    # The FOMAML run really differs from Reptile with the same draws otherwise.
    reptile = tmp_path / "reptile"
    assert main(["train", "--out", str(reptile), *SMALL_RUN]) == 0
    r = ckpt_io.load(reptile / "checkpoint.pt")
    assert not all(torch.equal(a["model"][k], r["model"][k]) for k in a["model"])
    # --resume refuses to change the algorithm or the tail.
    capsys.readouterr()
    assert main(["train", "--out", str(reptile), "--resume", "--foml", "--backend", "reference", "--quiet"]) == 2
    assert "--foml True differs from the checkpoint's False" in capsys.readouterr().err
    assert main(["train", "--out", str(whole), "--resume", "--foml-tail", "2", "--backend", "reference",
                 "--quiet"]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err


def test_eval_of_a_foml_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FOML_RUN]) == 0
    assert main(["eval", "--checkpoint", str(run), "--eval-samples", "3", "--backend", "reference", "--quiet"]) == 0
    assert "sine 10-shot: MSE" in capsys.readouterr().out


# ---------------------------------------------------------------------- the study script


def _study():
    spec = importlib.util.spec_from_file_location("gradient_combinations", REPO / "examples" / "gradient_combinations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_script_writes_csv_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    study = _study()
    assert study.main(["--combinations", "g1", "g2", "half-g1-g2", "--seeds", "2", "--meta-iters", "6",
                       "--eval-every", "3", "--eval-tasks", "3", "--backend", "reference", "--out-dir",
                       str(tmp_path)]) == 0
    rows = _rows(tmp_path / "gradient_combinations_sine.csv")
    assert list(rows[0]) == study.CSV_COLUMNS
    assert {(r["combination"], r["seed"]) for r in rows} == {(c, s) for c in ("g1", "g2", "half-g1-g2") for s in "01"}
    g2 = [r for r in rows if r["combination"] == "g2" and r["seed"] == "0"]
    assert [int(r["iteration"]) for r in g2] == [0, 3, 6] and {r["metric"] for r in g2} == {"test_mse"}
    assert g2[0]["algorithm"] == "fomaml" and g2[0]["label"] == "g2" and g2[0]["inner_iters"] == "2"
    half = [r for r in rows if r["combination"] == "half-g1-g2"]
    assert half[0]["label"] == "(g1+g2)/2" and float(half[0]["meta_step"]) == 0.125
    # Same seed, same initialisation: every combination starts from the same score.
    assert len({r["value"] for r in rows if r["iteration"] == "0" and r["seed"] == "0"}) == 1
    with Image.open(tmp_path / "gradient_combinations_sine.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    (tmp_path / "gradient_combinations_sine.png").unlink()
    assert study.main(["--replot", "--out-dir", str(tmp_path)]) == 0, "the chart is redrawn from the CSV alone"
    assert (tmp_path / "gradient_combinations_sine.png").is_file()


def test_study_script_on_an_omniglot_layout(tmp_path):
    pytest.importorskip("matplotlib")
    # 5-way tasks with 10 train shots (g2) and 5 + 1 evaluation shots: 11 drawings per character.
    root = make_omniglot(tmp_path / "omni", background=(12,), evaluation=(12,), drawings=11, size=28)
    study = _study()
    assert study.main(["--dataset", "omniglot", "--data-root", str(root), "--combinations", "g1", "g2",
                       "--meta-iters", "2", "--eval-every", "2", "--eval-tasks", "2", "--backend", "reference",
                       "--out-dir", str(tmp_path / "out")]) == 0
    rows = _rows(tmp_path / "out" / "gradient_combinations_omniglot.csv")
    assert {r["metric"] for r in rows} == {"train_acc", "test_acc"}
    assert {int(r["iteration"]) for r in rows} == {0, 2}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    assert (tmp_path / "out" / "gradient_combinations_omniglot.png").is_file()
