"""The evaluation protocol: query batching, restoring state between tasks, the confidence interval."""

import math

import pytest
import torch

from fewshot_fixtures import one_thread  # noqa: F401

from reptile_fused.app.config import TrainConfig
from reptile_fused.data import ImageClasses
from reptile_fused.app.evaluate import Restorer, evaluate, evaluate_task, mean_ci95, predict
from reptile_fused.models import OmniglotNet
from reptile_fused.app.problems import ClassificationProblem
from reptile_fused.app.train import make_optimizer


def _net():
    torch.manual_seed(0)
    return OmniglotNet(num_classes=3, image_size=8)


def test_non_transductive_predicts_each_query_with_the_support_set():
    net = _net()
    support, query = torch.rand(6, 1, 8, 8), torch.rand(3, 1, 8, 8)
    out = predict(net, support, query, transductive=False)
    for i in range(3):
        torch.testing.assert_close(out[i], net(torch.cat([support, query[i:i + 1]]))[-1], rtol=0, atol=0)
    trans = predict(net, support, query, transductive=True)
    torch.testing.assert_close(trans, net(query), rtol=0, atol=0)
    assert not torch.allclose(out, trans), "batch norm makes the two protocols differ"


def _problem(shots=1):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5 * 4, 1, 8, 8), dtype=torch.uint8, generator=g)
    classes = ImageClasses(images, torch.arange(6) * 4, [f"c{i}" for i in range(5)])
    return ClassificationProblem({"test": classes}, 3, shots, shots, torch.device("cpu"), train_split=None,
                                 eval_splits=["test"])


def test_tasks_do_not_leak_into_each_other_or_into_training():
    net = _net()
    opt = make_optimizer(net, TrainConfig(dataset="omniglot", data_root="x", learning_rate=0.01))
    # Give Adam some state first, as after training.
    for _ in range(2):
        opt.zero_grad()
        net(torch.rand(4, 1, 8, 8)).sum().backward()
        opt.step()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    state = opt.state_dict()
    problem = _problem()
    task = problem.eval_task("test", torch.Generator().manual_seed(3))
    a = evaluate_task(net, opt, problem, task, 3, 5, False, torch.Generator().manual_seed(4))
    for k, v in net.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = opt.state_dict()
    for i, entry in state["state"].items():
        assert after["state"][i]["step"] == entry["step"]
        assert torch.equal(after["state"][i]["exp_avg_sq"], entry["exp_avg_sq"])
    b = evaluate_task(net, opt, problem, task, 3, 5, False, torch.Generator().manual_seed(4))
    assert a == b, "same task, same batches: same score"
    r = Restorer(opt)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    r.restore()
    for k, v in net.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_evaluate_counts_one_query_per_class():
    net = _net()
    opt = make_optimizer(net, TrainConfig(dataset="omniglot", data_root="x"))
    result = evaluate(net, opt, _problem(), "test", 7, 3, 2, True, torch.Generator().manual_seed(0))
    assert result["tasks"] == 7
    # With 3 queries per task, every per-task accuracy is a multiple of 1/3.
    assert round(result["acc"] * 21) == pytest.approx(result["acc"] * 21, abs=1e-9)


def test_mean_ci95():
    mean, ci = mean_ci95([0.0, 1.0, 1.0, 0.0])
    assert mean == 0.5
    assert ci == pytest.approx(1.959963984540054 * math.sqrt((4 * 0.25) / 3 / 4))
    assert mean_ci95([0.7]) == (0.7, None)
    with pytest.raises(ValueError):
        mean_ci95([])
