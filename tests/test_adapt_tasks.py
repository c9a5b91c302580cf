"""``reptile_fused.batched.adapt_tasks``: n tasks adapted at once equal n sequential adaptations with the optimizer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile_fused import ReptileOptimizer
from reptile_fused.batched import AdaptedTasks, NotBatchableError, adapt_tasks


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()


def _trained(inner):
    """A net and its optimizer after a few steps, so the adaptation starts from inner state."""
    torch.manual_seed(0)
    net = _net()
    opt = ReptileOptimizer(net.parameters(), inner, lr=0.05, **({"momentum": 0.9} if inner == "sgd" else {}))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(5, 1, 6, 6, dtype=torch.float64)), torch.randint(0, 3, (5,))).backward()
        opt.step()
    return net, opt


def _sequential(net, opt, xs, ys, query_x, support_x, transductive):
    """Each task on its own copy of the net and optimizer: one opt.step() per mini-batch."""
    weights, outputs = [], []
    for i in range(xs.shape[1]):
        m, o = copy.deepcopy((net, opt))
        m.train()
        for s in range(xs.shape[0]):
            o.zero_grad()
            F.cross_entropy(m(xs[s, i]), ys[s, i]).backward()
            o.step()
        weights.append({name: p.detach().clone() for name, p in m.named_parameters()})
        m.eval()
        with torch.no_grad():
            if transductive:
                outputs.append(m(query_x[i]))
            else:
                outputs.append(torch.stack([m(torch.cat([support_x[i], q[None]]))[-1] for q in query_x[i]]))
    return weights, torch.stack(outputs)


@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_adapt_tasks_equals_sequential_adaptation(inner, transductive):
    net, opt = _trained(inner)
    g = torch.Generator().manual_seed(1)
    n, steps, batch = 4, 3, 5
    xs = torch.randn(steps, n, batch, 1, 6, 6, dtype=torch.float64, generator=g)
    ys = torch.randint(0, 3, (steps, n, batch), generator=g)
    support_x, query_x = xs[0], torch.randn(n, 3, 1, 6, 6, dtype=torch.float64, generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    saved = opt.state_dict()

    result = adapt_tasks(net, opt, xs, ys, query_x=query_x, support_x=support_x, transductive=transductive)

    assert isinstance(result, AdaptedTasks)
    want_weights, want_out = _sequential(net, opt, xs, ys, query_x, support_x, transductive)
    assert set(result.weights) == {name for name, _ in net.named_parameters()}
    for i, want in enumerate(want_weights):
        for name, w in want.items():
            assert result.weights[name].shape == (n, *w.shape)
            torch.testing.assert_close(result.weights[name][i], w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.predictions, want_out, rtol=1e-9, atol=1e-11)
    # The model and the optimizer were only read.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    after = opt.state_dict()
    for idx, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][idx][key]), torch.as_tensor(value)), key


def test_adapt_tasks_without_queries_and_with_one_batch_per_task():
    net, opt = _trained("sgd")
    g = torch.Generator().manual_seed(2)
    support_x = torch.randn(3, 4, 1, 6, 6, dtype=torch.float64, generator=g)
    support_y = torch.randint(0, 3, (3, 4), generator=g)
    steps = 2
    result = adapt_tasks(net, opt, support_x.expand(steps, *support_x.shape), support_y.expand(steps, *support_y.shape))
    assert result.predictions is None
    repeated = torch.stack([support_x] * steps), torch.stack([support_y] * steps)
    again = adapt_tasks(net, opt, *repeated)
    for name, w in result.weights.items():
        torch.testing.assert_close(w, again.weights[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="transductive=False needs support_x"):
        adapt_tasks(net, opt, *repeated, query_x=support_x, transductive=False)


def test_adapt_tasks_refuses_running_statistics():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = ReptileOptimizer(net.parameters(), lr=0.1)
    with pytest.raises(NotBatchableError, match="running statistics"):
        adapt_tasks(net, opt, torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3), loss_fn=F.mse_loss)
