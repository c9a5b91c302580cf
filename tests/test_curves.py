"""Learning curves: curves.png in every run folder, `reptile-fused plot`, --tensorboard."""

import csv
import os
import sys

import pytest
import torch
from PIL import Image

from fewshot_fixtures import one_thread  # noqa: F401
from reptile_fused.app.cli import main

pytest.importorskip("matplotlib")

SINE = ["--dataset", "sine", "--meta-iters", "12", "--eval-interval", "4", "--eval-iters", "2", "--inner-iters", "2",
        "--checkpoint-interval", "6", "--quiet"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("runs")
    runs = []
    for name, extra in (("reptile", []), ("small-step", ["--meta-step", "0.3"])):
        run = base / name
        assert main(["train", "--out", str(run), *SINE, *extra]) == 0
        runs.append(run)
    return runs


def test_train_writes_curves_png(two_runs):
    for run in two_runs:
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.csv"]
        with Image.open(run / "curves.png") as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300


def test_curves_follow_a_resumed_run(two_runs, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *SINE[:3], "6", *SINE[4:]]) == 0
    first = (run / "curves.png").stat().st_mtime_ns
    assert main(["train", "--out", str(run), "--resume", "--meta-iters", "12", "--quiet"]) == 0
    assert (run / "curves.png").stat().st_mtime_ns > first
    assert [int(r["iteration"]) for r in _rows(run / "metrics.csv")] == [0, 4, 8]


def test_plot_draws_several_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "charts" / "compare.png"
    assert main(["plot", *map(str, two_runs), "--out", str(out)]) == 0
    assert "Wrote" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG"
    # Also from the CSV itself, and without an extension (.png is added, as for the demo).
    assert main(["plot", str(two_runs[0] / "metrics.csv"), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one.png").is_file()


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reptile-fused plot: error: ") and "no metrics.csv" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_tensorboard_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["train", "--out", str(tmp_path / "run"), *SINE, "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("reptile-fused train: error: --tensorboard needs the tensorboard package: "
                   "pip install 'reptile-fused[tensorboard]'")
    assert not (tmp_path / "run").exists()


def test_tensorboard_event_files_load_in_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *SINE, "--tensorboard"]) == 0
    assert any(p.name.startswith("events.out.tfevents.") for p in run.iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/meta_step", "eval/test_mse"}
    rows = _rows(run / "metrics.csv")
    for tag, column in (("train/meta_step", "meta_step"), ("eval/test_mse", "test_mse")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["iteration"]) for r in rows]
        assert [e.value for e in events] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)


# ---------------------------------------------------------------------- issue 24


def _mode(path):
    return path.stat().st_mode & 0o777


def test_charts_get_the_same_permissions_as_the_other_files(two_runs, tmp_path):
    old = os.umask(0o022)
    try:
        run = two_runs[0]
        assert _mode(run / "curves.png") == _mode(run / "metrics.csv") == 0o644
        assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
        assert _mode(tmp_path / "c.png") == 0o644
    finally:
        os.umask(old)


def test_plot_out_folder_writes_into_it(two_runs, tmp_path, capsys):
    folder = tmp_path / "charts"
    folder.mkdir()
    assert main(["plot", *map(str, two_runs), "--out", str(folder)]) == 0
    assert f"Wrote {folder / 'plot.png'}" in capsys.readouterr().out
    assert (folder / "plot.png").is_file() and not (tmp_path / "charts.png").exists()
    assert main(["plot", str(two_runs[0]), "--out", str(tmp_path / "new") + "/"]) == 0
    assert (tmp_path / "new" / "plot.png").is_file()


@pytest.mark.parametrize("target", ["metrics.csv", "checkpoint.pt"])
def test_plot_never_overwrites_a_runs_files(target, two_runs, capsys):
    run = two_runs[0]
    before = (run / target).read_bytes()
    assert main(["plot", str(run), "--out", str(run / target)]) == 2
    assert "--out" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (run / target).read_bytes() == before


def _bad_metrics(tmp_path, two_runs, edit):
    run = tmp_path / "bad"
    run.mkdir()
    lines = (two_runs[0] / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(edit(lines)) + "\n")
    return run


@pytest.mark.parametrize("edit, words", [
    (lambda ls: ls[:2] + ["4,0.5,oops,0.3,0.1"] + ls[3:], "line 3: loss is 'oops', not a number"),
    (lambda ls: ls[:2] + ["4,,,,"] + ls[3:], "line 3: no value for meta_step (a partly written row?)"),
    (lambda ls: ls[:2] + ["4,0.5"] + ls[3:], "line 3: 2 cells, the header has 5"),
    (lambda ls: ls + ["4,0.5,0.1,0.2,0.1"], "line 5: iteration 4 after 8"),
    (lambda ls: [ls[0].replace("iteration", "iter")] + ls[1:], "no iteration column"),
    (lambda ls: [], "empty, no header"),
], ids=["unparsable", "empty-cells", "short-row", "out-of-order", "renamed-header", "empty"])
def test_plot_refuses_a_bad_metrics_file_naming_it(edit, words, two_runs, tmp_path, capsys):
    run = _bad_metrics(tmp_path, two_runs, edit)
    out = tmp_path / "x.png"
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reptile-fused plot: error: ") and "\n" not in err, err
    assert str(run / "metrics.csv") in err and words in err, err
    assert not out.exists(), "no chart with empty panels"


def test_tensorboard_that_fails_to_import_otherwise_is_one_line(tmp_path, capsys, monkeypatch):
    """A protobuf mismatch makes importing tensorboard raise TypeError, not ImportError."""
    import builtins

    real = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torch.utils.tensorboard" or name.startswith("tensorboard"):
            raise TypeError("Descriptors cannot be created directly.\nIf this call came from a _pb2.py file ...")
        return real(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    assert main(["train", "--out", str(tmp_path / "run"), *SINE, "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reptile-fused train: error: --tensorboard: importing tensorboard failed (TypeError: "
                          "Descriptors cannot be created directly.)") and "\n" not in err
    assert not (tmp_path / "run").exists()
