"""The command line: nothing lost, one line per error (issue 14, section 3).

Every run here is on sine waves for a handful of iterations: the whole file takes
seconds on one CPU core.
"""

import zipfile
from pathlib import Path

import pytest

from reptile_fused import backends
from reptile_fused.app import checkpoint as ckpt_io
from reptile_fused.app.cli import main

SINE = ["--dataset", "sine", "--quiet", "--threads", "1"]


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


# ---------------------------------------------------------------------- outputs checked first


def test_unwritable_outputs_fail_first_in_one_line(sine_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")

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
