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
