"""The command line: nothing lost, one line per error (issue 14, section 3).

Every run here is on sine waves for a handful of iterations: the whole file takes
seconds on one CPU core.
"""

import csv
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fewshot_fixtures import one_thread  # noqa: F401
from reptile_fused import backends
from reptile_fused.app import checkpoint as ckpt_io
from reptile_fused.app import train as train_mod
from reptile_fused.app.cli import _locked_run_dir, main
from reptile_fused.app.runlock import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[1]
SINE = ["--dataset", "sine", "--quiet"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one_error_line(err: str, command: str) -> str:
    """The error output is exactly one ``reptile-fused CMD: error: ...`` line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"reptile-fused {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sine") / "run"
    assert main(["train", *SINE, "--meta-iters", "3", "--out", str(run)]) == 0
    return run


# ---------------------------------------------------------------------- the run folder lock


def test_second_train_into_a_running_folder_fails_naming_the_holder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    second = {}

    def start_another(self):
        if self.iteration == 2 and not second:
            second["rc"] = main(["train", *SINE, "--meta-iters", "4", "--out", str(run)])
            second["err"] = capsys.readouterr().err

    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "_iteration_done", start_another)
        assert main(["train", *SINE, "--meta-iters", "6", "--eval-interval", "1", "--out", str(run)]) == 0
    assert second["rc"] == 2
    line = _one_error_line(second["err"], "train")
    assert "another run is writing into this folder" in line and f"pid {os.getpid()}" in line
    assert [int(r["iteration"]) for r in _rows(run / "metrics.csv")] == list(range(6)), "no interleaved rows"
    assert ckpt_io.load(run / "checkpoint.pt")["config"]["meta_iters"] == 6
    assert not (run / LOCK_NAME).exists(), "released at the end"


@pytest.mark.parametrize("how", [RuntimeError("simulated crash"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_lock_released_when_the_run_dies(tmp_path, monkeypatch, how):
    run = tmp_path / "run"

    def die(self):
        raise how

    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "_iteration_done", die)
        if isinstance(how, KeyboardInterrupt):  # a second Ctrl-C: one line, status 130
            assert main(["train", *SINE, "--meta-iters", "3", "--out", str(run)]) == 130
        else:
            with pytest.raises(type(how)):
                main(["train", *SINE, "--meta-iters", "3", "--out", str(run)])
    assert not (run / LOCK_NAME).exists()
    with RunLock(run):  # free again
        pass


def test_a_killed_holder_does_not_block_the_next_run(tmp_path, capsys):
    """A SIGKILLed run cannot clean up: its lock file stays, but its flock goes with it."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from reptile_fused.app.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", *SINE, "--meta-iters", "2", "--out", str(run)]) == 2
        assert f"pid {holder.pid}" in _one_error_line(capsys.readouterr().err, "train")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).exists(), "the killed holder left its file"
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(run)]) == 0
    assert not (run / LOCK_NAME).exists()


def test_only_rank_0_locks(tmp_path, monkeypatch):
    """Under torchrun only rank 0 writes into the run folder; the other ranks take no lock."""
    import reptile_fused.distributed as dist_mod

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        monkeypatch.setattr(dist_mod, "rank_and_world", lambda: (1, 2))
        with _locked_run_dir(run):
            pass
        monkeypatch.setattr(dist_mod, "rank_and_world", lambda: (0, 2))
        with pytest.raises(Exception, match="another run"):
            with _locked_run_dir(run):
                pass


# ---------------------------------------------------------------------- outputs checked first


def test_unwritable_outputs_fail_first_in_one_line(sine_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")

    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(a_file / "run")]) == 2
    assert f"{a_file} is a file, not a folder" in _one_error_line(capsys.readouterr().err, "train")

    assert main(["eval", "--checkpoint", str(sine_run), "--eval-samples", "2", "--quiet",
                 "--json", str(a_file / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert "--json" in _one_error_line(err, "eval") and out == "", "refused before evaluating"
    assert main(["eval", "--checkpoint", str(sine_run), "--eval-samples", "2", "--quiet",
                 "--json", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys.readouterr().err, "eval")

    assert main(["demo", "--iters", "2", "--test-tasks", "2", "--quiet", "--out", str(a_file / "d.png")]) == 2
    out, err = capsys.readouterr()
    assert "--out" in _one_error_line(err, "demo") and out == "", "refused before training"
    assert main(["demo", "--iters", "2", "--test-tasks", "2", "--quiet", "--out", str(tmp_path / "d.v2")]) == 2
    assert "cannot write .v2 files" in _one_error_line(capsys.readouterr().err, "demo")


def test_demo_out_without_extension_says_where_the_png_went(tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(["demo", "--iters", "2", "--test-tasks", "2", "--quiet", "--out", str(out)]) == 0
    assert (tmp_path / "empty.png").is_file() and not out.exists()
    assert f"Figure written to {out}.png" in capsys.readouterr().out


# ---------------------------------------------------------------------- help


def test_eval_help_prints_one_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "95% confidence" in text and "%%" not in text


# ---------------------------------------------------------------------- triton without CUDA


@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_triton_backend_without_cuda_is_one_line(command, sine_run, tmp_path, monkeypatch, capsys):
    # What the Triton backend says on a machine without CUDA (the test process runs
    # Triton's interpreter instead, see conftest.py, so it is stubbed here).
    real = backends.unavailable_reason

    def no_cuda(name, device):
        if name == "triton":
            return "Triton runs CPU tensors only in its interpreter, a slow testing tool"
        return real(name, device)

    monkeypatch.setattr(backends, "unavailable_reason", no_cuda)
    args = {
        "train": ["train", *SINE, "--meta-iters", "2", "--out", str(tmp_path / "run")],
        "eval": ["eval", "--checkpoint", str(sine_run), "--eval-samples", "2", "--quiet"],
        "demo": ["demo", "--iters", "2", "--test-tasks", "2", "--quiet", "--out", str(tmp_path / "d.png")],
    }[command]
    assert main([*args, "--device", "cpu", "--backend", "triton"]) == 2
    out, err = capsys.readouterr()
    assert "--backend triton runs on CUDA devices" in _one_error_line(err, command)
    assert out == "" and not (tmp_path / "run").exists(), "refused before any work"


# ---------------------------------------------------------------------- damaged checkpoints


def _damage(good: Path, path: Path, how: str) -> None:
    data = good.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 20)
    elif how == "bad-pickle":  # a sound zip whose pickled record is damaged
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                body = zin.read(info.filename)
                if info.filename.endswith("data.pkl"):
                    body = body[:40] + b"\xfe" * 8 + body[48:]
                zout.writestr(info, body)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "bad-pickle"])
def test_damaged_checkpoint_is_one_line_with_advice(how, sine_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _damage(sine_run / "checkpoint.pt", run / "checkpoint.pt", how)
    for argv, command in [(["eval", "--checkpoint", str(run), "--quiet"], "eval"),
                          (["train", "--out", str(run), "--resume", "--quiet"], "train")]:
        assert main(argv) == 2
        line = _one_error_line(capsys.readouterr().err, command)
        assert ("empty" if how == "empty" else "corrupt") in line
        assert "restore a good copy of it, or delete it and train again" in line
        assert "weights_only" not in line


# ---------------------------------------------------------------------- extending a run


def test_resume_extends_a_finished_run_reannealing_the_meta_step(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", *SINE, "--out", str(run)]
    assert main([*base, "--meta-iters", "4", "--eval-interval", "1", "--meta-step", "1", "--meta-step-final", "0"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--meta-iters", "8"]) == 0
    assert "Resuming" in capsys.readouterr().out
    ckpt = ckpt_io.load(run / "checkpoint.pt")
    assert ckpt["iteration"] == 8 and ckpt["config"]["meta_iters"] == 8
    rows = _rows(run / "metrics.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(8))
    # Iterations 0-3 annealed 1 -> 0 over 4; from 4 on, linearly over the new 8.
    assert [float(r["meta_step"]) for r in rows] == pytest.approx([1, .75, .5, .25, .5, .375, .25, .125])

    assert main(["train", "--out", str(run), "--resume", "--quiet", "--meta-iters", "6"]) == 2
    assert "extended, not shortened" in _one_error_line(capsys.readouterr().err, "train")
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0, "a plain resume of the extended run"
    assert ckpt_io.load(run / "checkpoint.pt")["iteration"] == 8


# ---------------------------------------------------------------------- outputs never land on a run's files (issue 24)


@pytest.mark.parametrize("target", ["checkpoint.pt", "metrics.csv"])
def test_eval_json_never_overwrites_the_run(target, sine_run, capsys):
    before = (sine_run / target).read_bytes()
    assert main(["eval", "--checkpoint", str(sine_run / "checkpoint.pt"), "--eval-samples", "2", "--quiet",
                 "--json", str(sine_run / target)]) == 2
    out, err = capsys.readouterr()
    assert "--json" in _one_error_line(err, "eval") and "Wrote" not in out
    assert (sine_run / target).read_bytes() == before


def test_eval_json_never_overwrites_a_checkpoint_given_by_another_name(sine_run, tmp_path, capsys):
    other = tmp_path / "best.pt"
    other.write_bytes((sine_run / "checkpoint.pt").read_bytes())
    assert main(["eval", "--checkpoint", str(other), "--eval-samples", "2", "--quiet", "--json", str(other)]) == 2
    assert "an input of this command" in _one_error_line(capsys.readouterr().err, "eval")
    assert ckpt_io.load(other)["iteration"] == 3


@pytest.mark.parametrize("argv", [
    ["train", *SINE, "--meta-iters", "2", "--out", ""],
    ["eval", "--checkpoint", "RUN", "--eval-samples", "2", "--quiet", "--json", ""],
    ["demo", "--iters", "2", "--test-tasks", "2", "--quiet", "--out", ""],
    ["plot", "RUN", "--out", ""],
], ids=["train", "eval", "demo", "plot"])
def test_empty_output_path_is_refused(argv, sine_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(sine_run) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    assert "is empty: give a path" in _one_error_line(capsys.readouterr().err, argv[0])
    assert list(tmp_path.iterdir()) == [], "nothing written into the current folder"


# ---------------------------------------------------------------------- metrics.csv is never lost (issue 24)


def test_fresh_train_moves_an_earlier_runs_rows_aside(sine_run, tmp_path, capsys):
    """A run killed before its first checkpoint leaves metrics.csv and no checkpoint.pt:
    training afresh into the folder keeps those rows, renamed, and says so."""
    run = tmp_path / "run"
    run.mkdir()
    earlier = (sine_run / "metrics.csv").read_bytes()
    (run / "metrics.csv").write_bytes(earlier)
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "held the rows of an earlier run" in err and "metrics.earlier-1.csv" in err
    assert (run / "metrics.earlier-1.csv").read_bytes() == earlier
    assert [int(r["iteration"]) for r in _rows(run / "metrics.csv")] == [0]
    # A second time: a new name, nothing overwritten.
    (run / "checkpoint.pt").unlink()
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(run)]) == 0
    assert (run / "metrics.earlier-1.csv").read_bytes() == earlier and (run / "metrics.earlier-2.csv").is_file()


def test_resume_drops_partly_written_and_out_of_order_rows(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SINE, "--meta-iters", "4", "--eval-interval", "1", "--out", str(run)]) == 0
    with open(run / "metrics.csv", "a") as f:
        f.write("3,,,,\n1,0.5,0.1,0.2,0.0\n")  # a partly written row, then one out of order
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--meta-iters", "6"]) == 0
    err = capsys.readouterr().err
    assert "dropped lines 6, 7" in err and "metrics.csv" in err
    rows = _rows(run / "metrics.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(6))
    assert all(v != "" for r in rows for v in r.values())


def test_resume_drops_rows_after_the_checkpoint(tmp_path, capsys):
    """The README's promise: rows written after the checkpoint are dropped and rewritten."""
    run = tmp_path / "run"
    assert main(["train", *SINE, "--meta-iters", "4", "--eval-interval", "1", "--out", str(run)]) == 0
    with open(run / "metrics.csv", "a") as f:
        f.write("4,0.5,0.1,0.2,0.0\n5,0.5,0.1,0.2,0.0\n4,0.5,0.1,0.2,0.0\n")
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--meta-iters", "6"]) == 0
    assert "dropped" not in capsys.readouterr().err, "rows after the checkpoint go without a note"
    rows = _rows(run / "metrics.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(6)) and rows[4]["loss"] != "0.1"


def test_resume_with_a_renamed_metrics_header_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *SINE, "--meta-iters", "2", "--eval-interval", "1", "--out", str(run)]) == 0
    text = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(text.replace("iteration", "iter", 1))
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--meta-iters", "3"]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert str(run / "metrics.csv") in line and "header" in line
    assert (run / "metrics.csv").read_text().startswith("iter,"), "left as it was"


# ---------------------------------------------------------------------- checkpoints checked on load (issue 24)


def _flip_a_weight_byte(good: Path, path: Path) -> None:
    """Change one byte of a tensor record in place: the zip stays readable, its CRC does not match."""
    import torch

    data = bytearray(good.read_bytes())
    ckpt = torch.load(good, weights_only=True)
    weight = next(v for k, v in ckpt["model"].items() if k.endswith("weight"))
    at = data.find(weight.contiguous().numpy().tobytes()[:16])
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def _resave(good: Path, path: Path, edit) -> None:
    import torch

    ckpt = torch.load(good, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def _both_commands_refuse(run, capsys, *words):
    for argv, command in [(["eval", "--checkpoint", str(run), "--quiet", "--eval-samples", "2"], "eval"),
                          (["train", "--out", str(run), "--resume", "--quiet"], "train")]:
        assert main(argv) == 2, command
        out, err = capsys.readouterr()
        line = _one_error_line(err, command)
        assert str(run / "checkpoint.pt") in line and all(w in line for w in words), line
        assert "accuracy" not in out and "MSE" not in out


def test_checkpoint_whose_bytes_changed_is_reported(sine_run, tmp_path, capsys):
    """The README's promise: a checkpoint damaged after it was written is reported, not
    evaluated (it used to score chance) or resumed (it used to train on with loss nan)."""
    run = tmp_path / "run"
    run.mkdir()
    _flip_a_weight_byte(sine_run / "checkpoint.pt", run / "checkpoint.pt")
    assert zipfile.is_zipfile(run / "checkpoint.pt")
    _both_commands_refuse(run, capsys, "corrupt", "does not match the checksum", "restore a good copy")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("optimizer"), ["no 'optimizer' entry"]),
    (lambda c: c.pop("config"), ["no 'config' entry"]),
    (lambda c: c.update(config=[1, 2]), ["'config' entry is a list, not a dict"]),
    (lambda c: c["config"].update(classes="5"), ["settings are not valid", "--classes must be an integer, got '5'"]),
    (lambda c: c["config"].update(meta_step=float("inf")), ["--meta-step must be a finite number"]),
    (lambda c: c.update(iteration="3"), ["'iteration' entry is a str"]),
    (lambda c: c["model"].update({k: v[:1] for k, v in c["model"].items() if k.endswith("weight")}),
     ["its weights do not fit", "size mismatch"]),
    (lambda c: c["optimizer"].update(param_groups=[]), ["optimizer state cannot be restored"]),
], ids=["no-optimizer", "no-config", "config-type", "config-value-type", "config-inf", "iteration-type",
        "weight-shape", "optimizer-groups"])
def test_checkpoint_with_wrong_entries_is_one_line(edit, words, sine_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _resave(sine_run / "checkpoint.pt", run / "checkpoint.pt", edit)
    _both_commands_refuse(run, capsys, *words)


def test_checkpoint_with_nan_weights_is_reported_not_evaluated(sine_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()

    def poison(c):
        w = next(k for k in c["model"] if k.endswith("weight"))
        c["model"][w][0] = float("nan")

    _resave(sine_run / "checkpoint.pt", run / "checkpoint.pt", poison)
    _both_commands_refuse(run, capsys, "holds nan or inf", "smaller --learning-rate")


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import torch

    run = tmp_path / "run"
    real = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    assert main(["train", *SINE, "--meta-iters", "4", "--checkpoint-interval", "2", "--out", str(run)]) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "No space left on device" in line and "of iteration 2 is kept" in line and "--resume" in line
    assert ckpt_io.load(run / "checkpoint.pt")["iteration"] == 2, "the last good checkpoint, untouched"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.csv"], "no temp file"


# ---------------------------------------------------------------------- nothing non-finite (issue 24)


@pytest.mark.parametrize("flags", [
    ["--meta-step", "inf"], ["--learning-rate", "inf"], ["--learning-rate", "1e400"], ["--meta-step-final", "nan"],
    ["--learning-rate", "nan"], ["--adam-beta2", "nan", "--inner-optimizer", "adam"],
], ids=["meta-step-inf", "lr-inf", "lr-1e400", "final-nan", "lr-nan", "beta2-nan"])
def test_non_finite_hyperparameters_are_refused(flags, tmp_path, capsys):
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(tmp_path / "run"), *flags]) == 2
    assert "must be a finite number" in _one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_naming_the_iteration(tmp_path, capsys):
    """--learning-rate 1e6 used to log nan on every row, print Done and exit 0."""
    run = tmp_path / "run"
    assert main(["train", *SINE, "--meta-iters", "20", "--eval-interval", "1", "--learning-rate", "1e6",
                 "--out", str(run)]) == 1
    out, err = capsys.readouterr()
    line = _one_error_line(err, "train")
    assert "the run diverged" in line and "iteration" in line and "smaller --learning-rate" in line
    assert "Done" not in out
    rows = _rows(run / "metrics.csv")
    assert all(r["loss"] not in ("nan", "inf") for r in rows), "no nan rows logged"


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import torch

    run = tmp_path / "run"
    real = train_mod.Trainer.train_iteration

    def nan_at_5(self):
        loss, steps, meta_lr = real(self)
        if self.iteration == 5:
            loss = loss * float("nan")
        return loss, steps, meta_lr

    monkeypatch.setattr(train_mod.Trainer, "train_iteration", nan_at_5)
    assert main(["train", *SINE, "--meta-iters", "8", "--eval-interval", "2", "--checkpoint-interval", "4",
                 "--out", str(run)]) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert line.startswith("reptile-fused train: error: iteration 5: the training loss is nan")
    assert f"{run / 'checkpoint.pt'} of iteration 4 is kept" in line
    ckpt = ckpt_io.load(run / "checkpoint.pt")
    assert ckpt["iteration"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [int(r["iteration"]) for r in _rows(run / "metrics.csv")] == [0, 2, 4], "no row for the nan window"


def test_non_finite_weights_stop_the_run(tmp_path, monkeypatch, capsys):
    """The meta step itself can go non-finite (the loss before it was finite)."""
    import torch

    run = tmp_path / "run"
    real = train_mod.Trainer.train_iteration

    def inf_weights_at_2(self):
        out = real(self)
        if self.iteration == 2:
            with torch.no_grad():
                self.opt.flat_buffers[0].data[0] = float("inf")
        return out

    monkeypatch.setattr(train_mod.Trainer, "train_iteration", inf_weights_at_2)
    assert main(["train", *SINE, "--meta-iters", "6", "--eval-interval", "3", "--checkpoint-interval", "1",
                 "--out", str(run)]) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "iteration 2: the meta-weights hold nan or inf" in line and "of iteration 2 is kept" in line
    assert ckpt_io.load(run / "checkpoint.pt")["iteration"] == 2


def test_eval_json_is_valid_json_when_the_score_is_not_finite(sine_run, tmp_path, monkeypatch, capsys):
    import json

    from reptile_fused.app import evaluate as eval_mod

    def diverged(*args, **kwargs):
        return {"mse": float("nan"), "ci95": float("nan"), "tasks": 4, "nonfinite_tasks": 3, "batch_tasks": 1,
                "cuda_graph": False}

    monkeypatch.setattr(eval_mod, "evaluate", diverged)
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(sine_run), "--eval-samples", "4", "--quiet", "--json", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert "diverged on 3 of 4 tasks" in line
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert result["mse"] is None and result["ci95"] is None and result["finite"] is False
    assert result["nonfinite_tasks"] == 3


# ---------------------------------------------------------------------- values not reinterpreted (issue 24)


@pytest.mark.parametrize("flags, words", [
    (["--inner-iters", "0"], "--inner-iters must be >= 1"),
    (["--data-root", "somewhere"], "--dataset sine reads no data"),
], ids=["inner-iters-0", "sine-data-root"])
def test_sine_flags_that_would_be_ignored_are_refused(flags, words, tmp_path, capsys):
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(tmp_path / "run"), *flags]) == 2
    assert words in _one_error_line(capsys.readouterr().err, "train")


def test_eval_of_sine_with_a_data_root_is_refused(sine_run, capsys):
    assert main(["eval", "--checkpoint", str(sine_run), "--eval-samples", "2", "--quiet", "--data-root", "x"]) == 2
    assert "--dataset sine reads no data" in _one_error_line(capsys.readouterr().err, "eval")


# ---------------------------------------------------------------------- Ctrl-C and printed commands (issue 24)


def test_second_ctrl_c_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def two_ctrl_c(self):
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # first: finish the iteration ...
            os.kill(os.getpid(), signal.SIGINT)  # second: abort

    monkeypatch.setattr(train_mod.Trainer, "_iteration_done", two_ctrl_c)
    assert main(["train", *SINE, "--meta-iters", "6", "--checkpoint-interval", "1", "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("reptile-fused train: aborted by a second Ctrl-C at iteration 2")
    assert f"{run / 'checkpoint.pt'} of iteration 1 is kept" in last
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler restored"


def test_printed_commands_are_shell_quoted(tmp_path, capsys):
    import shlex

    run = tmp_path / "a run; with 'quotes'"
    assert main(["train", *SINE, "--meta-iters", "2", "--out", str(run)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Evaluate with: "))
    argv = shlex.split(line[len("Evaluate with: "):])
    assert argv == ["reptile-fused", "eval", "--checkpoint", str(run / "checkpoint.pt")]
    assert main(argv[1:] + ["--eval-samples", "2", "--quiet"]) == 0
