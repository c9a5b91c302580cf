"""Batched evaluation (many tasks adapted at once under vmap) against the sequential protocol."""

import pytest
import torch
from torch import nn

from fewshot_fixtures import one_thread  # noqa: F401

from reptile_fused.batched import BatchedAdapter, NotBatchableError
from reptile_fused.app.config import TrainConfig
from reptile_fused.app.evaluate import Restorer, adapt, draw_task, evaluate, predict
from reptile_fused.app.problems import ClassificationProblem, SineProblem
from reptile_fused.app.train import make_optimizer
from reptile_fused.data import ImageClasses, Task
from reptile_fused.models import OmniglotNet, SineMLP


class _Cast:
    """A problem whose tasks come in ``dtype`` (float64 runs of the protocol)."""

    def __init__(self, problem, dtype):
        self.p, self.dtype = problem, dtype
        self.kind, self.metric, self.loss, self.score = problem.kind, problem.metric, problem.loss, problem.score

    def eval_task(self, split, generator):
        t = self.p.eval_task(split, generator)
        return Task(t.support_x.to(self.dtype), t.support_y, t.query_x.to(self.dtype), t.query_y)


def _problem(shots=2, ways=3, size=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6 * 5, 1, size, size), dtype=torch.uint8, generator=g)
    classes = ImageClasses(images, torch.arange(7) * 5, [f"c{i}" for i in range(6)])
    p = ClassificationProblem({"test": classes}, ways, shots, shots, torch.device("cpu"), train_split=None,
                              eval_splits=["test"])
    return p if dtype == torch.float32 else _Cast(p, dtype)


def _trained(inner="adam", dtype=torch.float32, net=None, lr=0.01, steps=3):
    """A net and its optimizer with inner state, as after training."""
    torch.manual_seed(0)
    net = (net or OmniglotNet(num_classes=3, image_size=8)).to(dtype)
    opt = make_optimizer(net, TrainConfig(dataset="omniglot", data_root="x", learning_rate=lr, inner_optimizer=inner))
    for _ in range(steps):
        opt.zero_grad()
        net(torch.rand(4, 1, 8, 8, dtype=dtype)).sum().backward()
        opt.step()
    return net, opt


def _sequential(net, opt, problem, drawn, transductive):
    """Per task: adapted weights and query outputs, the sequential way (then restored)."""
    restorer = Restorer(opt)
    weights, outs = [], []
    for task, order in drawn:
        net.train()
        adapt(net, opt, problem.loss, task.support_x, task.support_y, 0, 0, None, order)
        weights.append(torch.cat([p.detach().flatten().clone() for p in net.parameters()]))
        net.eval()
        outs.append(predict(net, task.support_x, task.query_x, transductive))
        restorer.restore()
    net.train()
    return weights, outs


def _batched(net, opt, problem, drawn, transductive):
    adapter = BatchedAdapter(net, opt, problem.loss)
    sx = torch.stack([t.support_x for t, _ in drawn])
    sy = torch.stack([t.support_y for t, _ in drawn])
    orders = torch.stack([o for _, o in drawn])
    rows = torch.arange(len(drawn))[:, None, None]
    adapted = adapter.adapt(sx[rows, orders].transpose(0, 1), sy[rows, orders].transpose(0, 1))
    names = dict(net.named_parameters())
    by_name = {name: leaf for r in adapted for name, leaf in zip(r.names, r.leaves)}
    weights = [torch.cat([by_name[n][i].detach().flatten() for n in names]) for i in range(len(drawn))]
    out = adapter.predict(adapted, sx, torch.stack([t.query_x for t, _ in drawn]), transductive)
    return weights, list(out)


def _draw(problem, n, batch=3, iters=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [draw_task(problem, "test", batch, iters, g) for _ in range(n)]


@pytest.mark.parametrize("transductive", [False, True])
@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_float64_adapted_weights_and_outputs_match_sequential(inner, transductive):
    net, opt = _trained(inner, torch.float64)
    problem = _problem(dtype=torch.float64)
    drawn = _draw(problem, 5)
    w_seq, o_seq = _sequential(net, opt, problem, drawn, transductive)
    w_bat, o_bat = _batched(net, opt, problem, drawn, transductive)
    for a, b in zip(w_seq, w_bat):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(o_seq, o_bat):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("transductive", [False, True])
def test_float64_evaluate_scores_identical_whatever_the_batch(transductive):
    net, opt = _trained("adam", torch.float64)
    problem = _problem(dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    results = [evaluate(net, opt, problem, "test", 7, 3, 6, transductive, torch.Generator().manual_seed(2),
                        batch_tasks=bt) for bt in (1, 3, 7, 16)]
    assert [r["batch_tasks"] for r in results] == [1, 3, 7, 16]
    for r in results[1:]:
        assert r["acc"] == results[0]["acc"] and r["ci95"] == results[0]["ci95"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), "batched evaluation leaves the weights alone"


def test_float32_agrees_within_tolerance():
    """float32: vmap's batched kernels sum in another order; the documented tolerance on
    the query outputs is rtol=1e-4, atol=1e-5 for these settings, and predictions agree."""
    net, opt = _trained("adam")
    problem = _problem()
    drawn = _draw(problem, 6)
    state = opt.state_dict()
    w_seq, o_seq = _sequential(net, opt, problem, drawn, False)
    w_bat, o_bat = _batched(net, opt, problem, drawn, False)
    for a, b in zip(w_seq, w_bat):
        assert (b - a).norm() <= 1e-4 * (a.norm() + 1)
    for a, b in zip(o_seq, o_bat):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # The optimizer was only read.
    after = opt.state_dict()
    for i, entry in state["state"].items():
        assert after["state"][i]["step"] == entry["step"]
        assert torch.equal(after["state"][i]["exp_avg"], entry["exp_avg"])


def test_sine_regression_batched_matches_sequential():
    torch.manual_seed(0)
    net = SineMLP()
    opt = make_optimizer(net, TrainConfig(dataset="sine", learning_rate=0.02, inner_optimizer="sgd"))
    problem = SineProblem(10, 10, torch.device("cpu"))
    a = evaluate(net, opt, problem, "test", 6, 10, 8, False, torch.Generator().manual_seed(0), batch_tasks=1)
    b = evaluate(net, opt, problem, "test", 6, 10, 8, False, torch.Generator().manual_seed(0), batch_tasks=4)
    assert b["batch_tasks"] == 4
    assert b["mse"] == pytest.approx(a["mse"], rel=1e-5)


class _RunningStatNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


class _ItemNet(nn.Module):
    """vmap cannot batch ``.item()``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x) * (1.0 if x.sum().item() >= 0 else 1.0)


@pytest.mark.parametrize("make", [_RunningStatNet, _ItemNet])
def test_unbatchable_models_fall_back_to_sequential_with_a_notice(make):
    torch.manual_seed(0)
    net = make()
    opt = make_optimizer(net, TrainConfig(dataset="omniglot", data_root="x", learning_rate=0.01))
    problem = _problem()
    notices = []
    seq = evaluate(net, opt, problem, "test", 5, 3, 4, False, torch.Generator().manual_seed(0), batch_tasks=1)
    bat = evaluate(net, opt, problem, "test", 5, 3, 4, False, torch.Generator().manual_seed(0), batch_tasks=4,
                   notice=notices.append)
    assert bat["batch_tasks"] == 1 and bat["acc"] == seq["acc"]
    assert len(notices) == 1 and "\n" not in notices[0] and "one task at a time" in notices[0]
    with pytest.raises(NotBatchableError) if make is _RunningStatNet else _nothing():
        BatchedAdapter(net, opt, problem.loss)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_eval_batch_tasks_must_be_positive():
    net, opt = _trained()
    with pytest.raises(ValueError, match="eval-batch-tasks"):
        evaluate(net, opt, _problem(), "test", 2, 3, 2, False, torch.Generator(), batch_tasks=0)


# ---------------------------------------------------------------------- command line and training


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    from fewshot_fixtures import make_folder
    from reptile_fused.app.cli import main

    root = make_folder(tmp_path_factory.mktemp("folder"), classes=8, per_class=4, size=8)
    torch.set_num_threads(1)
    runs = {}
    for bt in ("1", "2"):
        run = tmp_path_factory.mktemp(f"run{bt}") / "run"
        assert main(["train", "--data-root", str(root), "--out", str(run), "--dataset", "folder", "--image-size", "8",
                     "--channels", "1", "--model", "omniglot", "--train-fraction", "0.6", "--classes", "3",
                     "--shots", "1", "--train-shots", "2", "--inner-batch", "3", "--inner-iters", "2",
                     "--meta-iters", "4", "--eval-interval", "2", "--eval-batch", "2", "--eval-iters", "3",
                     "--eval-batch-tasks", bt, "--quiet"]) == 0
        runs[bt] = run
    return runs


def test_train_periodic_evaluation_is_the_same_batched(folder_run):
    import csv

    rows = {}
    for bt, run in folder_run.items():
        with open(run / "metrics.csv", newline="") as f:
            rows[bt] = [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]
    assert rows["1"] == rows["2"] and len(rows["1"]) == 2


def test_eval_cli_batched_equals_sequential_and_says_so(folder_run, tmp_path, capsys):
    import json

    from reptile_fused.app.cli import main

    results = {}
    for bt in ("1", "5"):
        out = tmp_path / f"{bt}.json"
        assert main(["eval", "--checkpoint", str(folder_run["1"]), "--eval-samples", "7", "--eval-batch-tasks", bt,
                     "--json", str(out), "--quiet"]) == 0
        results[bt] = json.loads(out.read_text())
    assert results["5"]["settings"]["eval_batch_tasks"] == 5 and results["1"]["settings"]["eval_batch_tasks"] == 1
    assert results["5"]["accuracy"] == results["1"]["accuracy"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder_run["1"]), "--eval-batch-tasks", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "reptile-fused eval: error: --eval-batch-tasks must be >= 1, got 0"


def test_eval_progress_bar_shows_rate_and_time_left(folder_run, capsys):
    from reptile_fused.app.cli import main

    assert main(["eval", "--checkpoint", str(folder_run["1"]), "--eval-samples", "6", "--eval-batch-tasks", "3"]) == 0
    err = capsys.readouterr().err
    assert "6/6 tasks" in err and "left" in err and ("task/s" in err or "s/task" in err)
