"""End-to-end: the command line on generated datasets, checkpoints, resume, eval and the demo."""

import csv
import json
import re

import pytest
import torch
from PIL import Image

from fewshot_fixtures import make_folder, make_miniimagenet, make_omniglot, one_thread  # noqa: F401
from reptile_fused.app import checkpoint as ckpt_io
from reptile_fused.app import train as train_mod
from reptile_fused.app.cli import main
from reptile_fused.app.config import PRESETS, resolve


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("omni"), background=(3, 2), evaluation=(2, 1), drawings=4)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), classes=8, per_class=4, size=8)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_then_eval_omniglot(omniglot_root, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--dataset", "omniglot", "--data-root", str(omniglot_root), "--out", str(run),
               "--classes", "2", "--shots", "1", "--train-shots", "2", "--inner-batch", "4", "--inner-iters", "2",
               "--meta-batch", "2", "--meta-iters", "6", "--meta-step", "1", "--meta-step-final", "0",
               "--eval-interval", "2", "--eval-batch", "2", "--eval-iters", "2", "--checkpoint-interval", "4",
               "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.csv"], \
        "no temporary files left"
    rows = _rows(run / "metrics.csv")
    assert [int(r["iteration"]) for r in rows] == [0, 2, 4]
    assert list(rows[0]) == ["iteration", "meta_step", "loss", "train_acc", "test_acc", "wall_s"]
    # Linear annealing from 1 to 0 over 6 iterations, as the authors' code.
    assert [float(r["meta_step"]) for r in rows] == pytest.approx([1.0, 4 / 6, 2 / 6])
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    ckpt = ckpt_io.load(run / "checkpoint.pt")
    assert ckpt["iteration"] == 6
    assert ckpt["model_spec"] == {"name": "omniglot", "num_classes": 2, "in_channels": 1, "image_size": 28}
    assert ckpt["config"]["inner_optimizer"] == "adam" and ckpt["config"]["adam_beta1"] == 0.0

    out_json = tmp_path / "eval" / "result.json"
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--eval-samples", "12", "--json",
               str(out_json), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"omniglot 2-way 1-shot \(non-transductive, test split\): accuracy \d+\.\d\d% ± \d+\.\d\d%", printed)
    result = json.loads(out_json.read_text())
    assert set(result) == {"accuracy", "ci95", "tasks", "settings"}
    assert result["tasks"] == 12 and 0 <= result["accuracy"] <= 1 and result["ci95"] >= 0
    assert result["settings"]["transductive"] is False and result["settings"]["eval_iters"] == 2
    assert result["settings"]["data_root"] == str(omniglot_root)
    # Same seed, same result; the transductive protocol is a different measurement.
    again = tmp_path / "again.json"
    main(["eval", "--checkpoint", str(run), "--eval-samples", "12", "--json", str(again), "--quiet"])
    assert json.loads(again.read_text())["accuracy"] == result["accuracy"]
    trans = tmp_path / "trans.json"
    main(["eval", "--checkpoint", str(run), "--eval-samples", "12", "--transductive", "--json", str(trans), "--quiet"])
    assert json.loads(trans.read_text())["settings"]["transductive"] is True


def test_train_and_eval_miniimagenet_layout(tmp_path):
    root = make_miniimagenet(tmp_path / "mini", classes=(3, 2, 2), per_class=3, size=16)
    run = tmp_path / "run"
    rc = main(["train", "--dataset", "miniimagenet", "--data-root", str(root), "--out", str(run), "--classes", "2",
               "--shots", "1", "--inner-batch", "2", "--inner-iters", "1", "--meta-iters", "2", "--eval-batch", "2",
               "--eval-iters", "1", "--eval-interval", "1", "--quiet"])
    assert rc == 0
    assert list(_rows(run / "metrics.csv")[0]) == ["iteration", "meta_step", "loss", "train_acc", "val_acc", "wall_s"]
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(run), "--eval-samples", "3", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["settings"]["split"] == "test"


# ---------------------------------------------------------------------- resume


FOLDER_ARGS = ["--dataset", "folder", "--image-size", "8", "--channels", "1", "--model", "omniglot", "--train-fraction", "0.6",
               "--classes", "3", "--shots", "1", "--train-shots", "2", "--inner-batch", "3", "--inner-iters", "3",
               "--meta-batch", "2", "--meta-iters", "10", "--meta-step", "1", "--meta-step-final", "0.2",
               "--eval-interval", "3", "--eval-batch", "2", "--eval-iters", "2", "--checkpoint-interval", "4",
               "--seed", "7", "--quiet"]


def _train(folder_root, run, *extra):
    return main(["train", "--data-root", str(folder_root), "--out", str(run), *FOLDER_ARGS, *extra])


def _assert_same_run(a, b):
    ca, cb = ckpt_io.load(a / "checkpoint.pt"), ckpt_io.load(b / "checkpoint.pt")
    assert ca["iteration"] == cb["iteration"] == 10
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa, "Adam state is checkpointed"
    for i in sa:
        for k in sa[i]:
            v, w = sa[i][k], sb[i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, k)
    assert torch.equal(ca["rng"]["train"], cb["rng"]["train"])

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    assert strip(_rows(a / "metrics.csv")) == strip(_rows(b / "metrics.csv"))
    assert [int(r["iteration"]) for r in _rows(b / "metrics.csv")] == [0, 3, 6, 9], "no duplicated rows"


@pytest.fixture(scope="module")
def uninterrupted(folder_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _train(folder_root, run) == 0
    return run


def test_crash_then_resume_equals_uninterrupted(folder_root, uninterrupted, tmp_path, monkeypatch):
    run = tmp_path / "crashed"

    def crash(self):
        if self.iteration == 7:  # after the checkpoint at 4, before the one at 8
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "_iteration_done", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _train(folder_root, run)
    assert ckpt_io.load(run / "checkpoint.pt")["iteration"] == 4
    assert [int(r["iteration"]) for r in _rows(run / "metrics.csv")] == [0, 3, 6], "rows past the checkpoint exist"
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    _assert_same_run(uninterrupted, run)


def test_stop_request_then_resume_equals_uninterrupted(folder_root, uninterrupted, tmp_path, monkeypatch, capsys):
    """Ctrl-C stops after the current iteration with a checkpoint there (exit 130)."""
    run = tmp_path / "stopped"

    def ctrl_c(self):
        if self.iteration == 5:
            self.stop_requested = True

    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "_iteration_done", ctrl_c)
        assert _train(folder_root, run) == 130
    assert ckpt_io.load(run / "checkpoint.pt")["iteration"] == 5, "stopped mid-interval, checkpoint where it stopped"
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    _assert_same_run(uninterrupted, run)


def test_channels_last_run_resumes_bit_exact(folder_root, tmp_path, monkeypatch):
    """--channels-last keeps the conv weights channels-last in the flat buffer for the whole
    run, and a resumed channels-last run equals an uninterrupted one."""
    whole, run = tmp_path / "whole", tmp_path / "crashed"
    assert _train(folder_root, whole, "--channels-last") == 0
    seen = []

    def crash(self):
        w = self.model.features[3].weight
        seen.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())
        if self.iteration == 7:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "_iteration_done", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _train(folder_root, run, "--channels-last")
    assert seen and all(seen)
    assert main(["train", "--out", str(run), "--resume", "--channels-last", "--quiet"]) == 0
    _assert_same_run(whole, run)


def test_resume_refuses_changed_settings_and_existing_runs(folder_root, uninterrupted, capsys):
    assert main(["train", "--out", str(uninterrupted), "--resume", "--inner-iters", "9"]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err
    assert _train(folder_root, uninterrupted) == 2
    assert "pass --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------- errors


def test_clear_errors(tmp_path, omniglot_root, uninterrupted, capsys):
    missing = tmp_path / "nowhere"
    assert main(["train", "--dataset", "omniglot", "--data-root", str(missing), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err and "Traceback" not in err

    assert main(["train", "--dataset", "omniglot", "--data-root", str(omniglot_root), "--out", str(tmp_path / "b"),
                 "--classes", "3", "--shots", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 classes, but 3-way tasks need at least 3" in err and str(omniglot_root) in err

    assert main(["train", "--dataset", "omniglot", "--data-root", str(omniglot_root), "--out", str(tmp_path / "c"),
                 "--classes", "2", "--shots", "4"]) == 2
    assert "4 images, but tasks need 5 per class" in capsys.readouterr().err

    assert main(["train", "--dataset", "omniglot", "--out", str(tmp_path / "d")]) == 2
    assert "--data-root is required" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(uninterrupted), "--classes", "5"]) == 2
    assert "3 outputs" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    assert main(["train", "--preset", "omniglot-5way-1shot", "--dataset", "miniimagenet", "--data-root", "x",
                 "--out", str(tmp_path / "e")]) == 2
    assert "preset omniglot-5way-1shot is for --dataset omniglot" in capsys.readouterr().err


def test_presets_carry_the_authors_settings():
    c = resolve({"data_root": "x"}, "omniglot-5way-1shot")
    assert (c.dataset, c.classes, c.shots, c.train_shots, c.inner_batch, c.inner_iters) == ("omniglot", 5, 1, 12, 5, 12)
    assert (c.meta_step, c.meta_step_final, c.meta_batch, c.meta_iters) == (1.0, 0.0, 3, 200_000)
    assert (c.eval_batch, c.eval_iters, c.learning_rate, c.transductive) == (5, 86, 0.00044, False)
    assert c.inner_optimizer == "adam" and c.adam_beta1 == 0.0
    assert resolve({"data_root": "x", "inner_iters": 3}, "omniglot-5way-1shot").inner_iters == 3, "flags win"
    assert resolve({"data_root": "x"}, "miniimagenet-5way-1shot-transductive").transductive
    assert {p.paper for p in PRESETS.values()} >= {95.39, 98.90, 97.68, 47.07, 62.74, 49.97}
    # Without a preset, the authors' args.py defaults.
    d = resolve({"dataset": "omniglot", "data_root": "x"})
    assert (d.classes, d.shots, d.inner_batch, d.inner_iters, d.meta_step, d.meta_iters) == (5, 5, 5, 20, 0.1, 400_000)
    assert d.final_meta_step == 0.1, "no annealing unless --meta-step-final is given"


# ---------------------------------------------------------------------- demo


def test_demo_writes_png_and_meta_init_wins(tmp_path, capsys):
    out = tmp_path / "fig" / "demo.png"
    assert main(["demo", "--iters", "600", "--out", str(out), "--test-tasks", "40", "--quiet"]) == 0
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 300
    text = capsys.readouterr().out
    meta = float(re.search(r"meta-learned init: ([\d.]+)", text).group(1))
    rand = float(re.search(r"random init:\s+([\d.]+)", text).group(1))
    assert meta < rand, text


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_run_sees_the_same_tasks_and_writes_its_files(folder_root, tmp_path):
    from reptile_fused.data import TaskSampler, load_folder

    splits = load_folder(folder_root, image_size=8, channels=1, train_fraction=0.6)
    cpu = TaskSampler(splits["train"], 3, 2, 1, generator=torch.Generator().manual_seed(3)).sample()
    gpu = TaskSampler(splits["train"].to("cuda"), 3, 2, 1, generator=torch.Generator().manual_seed(3)).sample()
    assert gpu.support_x.is_cuda
    assert torch.equal(cpu.support_x, gpu.support_x.cpu()) and torch.equal(cpu.query_y, gpu.query_y.cpu())

    run = tmp_path / "cuda"
    assert _train(folder_root, run, "--device", "cuda") == 0
    ckpt = ckpt_io.load(run / "checkpoint.pt")
    assert ckpt["device"].startswith("cuda") and ckpt["iteration"] == 10
    out = tmp_path / "cuda.json"
    assert main(["eval", "--checkpoint", str(run), "--device", "cuda", "--eval-samples", "5", "--json", str(out),
                 "--quiet"]) == 0
    assert json.loads(out.read_text())["settings"]["device"].startswith("cuda")
