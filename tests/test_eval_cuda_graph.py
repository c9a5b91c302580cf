"""Batched evaluation recorded as a CUDA graph (``BatchedAdapter(capture=True)``,
``--eval-cuda-graph``).

Where no GPU is, the graph's bookkeeping is checked without the graph: the rows whose
learning rate and Adam step count are device tensors (what the graph reads), and the
record-once / reload / replay logic with an emulated graph that re-runs the recorded
function on its static inputs.  The GPU-marked tests replay real graphs.
"""

import pytest
import torch
from torch import nn

from fewshot_fixtures import one_thread  # noqa: F401
from test_eval_batched import _batched, _draw, _problem, _sequential

from reptile_fused.batched import BatchedAdapter
from reptile_fused.batched import adapter as batched_adapter
from reptile_fused.app.config import TrainConfig
from reptile_fused.app.evaluate import EvalBatching, evaluate
from reptile_fused.app.train import make_optimizer
from reptile_fused.backends import available_backends
from reptile_fused.models import OmniglotNet

CPU_BACKENDS = available_backends("cpu")


def _small_net():
    # A few hundred weights: Triton's CPU interpreter steps them in seconds.
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _net_and_opt(inner="adam", dtype=torch.float32, device="cpu", backend="auto", steps=3, momentum_sgd=False,
                 small=False):
    """A net and its optimizer after ``steps`` inner steps (Adam moments / SGD momentum)."""
    torch.manual_seed(0)
    net = (_small_net() if small else OmniglotNet(num_classes=3, image_size=8)).to(device=device, dtype=dtype)
    opt = make_optimizer(net, TrainConfig(dataset="omniglot", data_root="x", learning_rate=0.01, inner_optimizer=inner),
                         backend)
    if momentum_sgd:
        opt.param_groups[0]["momentum"] = 0.9
    for _ in range(steps):
        opt.zero_grad()
        net(torch.rand(4, 1, 8, 8, dtype=dtype, device=device)).sum().backward()
        opt.step()
    return net, opt


def _inputs(problem, drawn, device="cpu"):
    sx = torch.stack([t.support_x for t, _ in drawn])
    sy = torch.stack([t.support_y for t, _ in drawn])
    orders = torch.stack([o for _, o in drawn]).to(sx.device)
    rows = torch.arange(len(drawn), device=sx.device)[:, None, None]
    return sx[rows, orders].transpose(0, 1).to(device), sy[rows, orders].transpose(0, 1).to(device)


def _weights(net, rows, n):
    by_name = {name: leaf for r in rows for name, leaf in zip(r.names, r.leaves)}
    return [torch.cat([by_name[name][i].detach().flatten() for name, _ in net.named_parameters()]) for i in range(n)]


class _EmulatedGraph:
    """What :class:`~reptile_fused.batched.graph.CapturedIteration` does, minus CUDA:
    the recording's warm-up runs the call on static copies of the inputs; a replay
    copies new inputs into them and runs it again."""

    made: list = []

    def __init__(self, run, xs, ys, inner_steps, device=None):
        self.run, self.static, self.replays = run, (xs.clone(), ys.clone()), 0
        run(*self.static, inner_steps)
        _EmulatedGraph.made.append(self)

    def replay(self, xs, ys):
        self.static[0].copy_(xs)
        self.static[1].copy_(ys)
        self.run(*self.static, None)
        self.replays += 1


@pytest.fixture
def emulated_graph(monkeypatch):
    _EmulatedGraph.made = []
    monkeypatch.setattr(batched_adapter, "CapturedIteration", _EmulatedGraph)
    monkeypatch.setattr(batched_adapter, "capture_unavailable_reason", lambda opt: None)
    return _EmulatedGraph


# ---------------------------------------------------------------- bookkeeping, on the CPU


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_device_scalar_rows_match_python_scalars(inner, backend):
    # The rows a graph records: lr and Adam's step count read from 0-dim tensors, the
    # step count advanced on the device from the optimizer's own (3 steps after training).
    net, opt = _net_and_opt(inner, backend=backend, momentum_sgd=inner == "sgd", small=True)
    problem = _problem()
    drawn = _draw(problem, 4, iters=5)
    xs, ys = _inputs(problem, drawn)
    plain = BatchedAdapter(net, opt, problem.loss)
    scalars = BatchedAdapter(net, opt, problem.loss)
    scalars._device_scalars = True
    a, b = plain.adapt(xs, ys), scalars.adapt(xs, ys)
    start = torch.cat([p.detach().flatten() for p in net.parameters()])
    for wa, wb in zip(_weights(net, a, 4), _weights(net, b, 4)):
        assert (wa - start).norm() > 0
        torch.testing.assert_close(wb, wa, rtol=1e-6, atol=1e-7)
    r = b[0]
    assert float(r.lr_t) == pytest.approx(0.01)
    if inner == "adam":
        assert float(r.step_t) == 3 + 5
    # Loading again restarts from the optimizer: the step count too.
    r.load()
    assert float(r.step_t) == opt._flats[0].steps[0]
    torch.testing.assert_close(r.tasks[2], opt._flats[0].buffer.data)


def test_recorded_once_per_shape_reloaded_and_replayed(emulated_graph):
    # 8 tasks, 3 at a time: two full batches (one recording, one replay) and a last
    # batch of 2 (its own recording); the scores are the eager batched ones.
    net, opt = _net_and_opt("adam")
    problem = _problem()
    eager = evaluate(net, opt, problem, "test", 8, 3, 4, False, torch.Generator().manual_seed(3), batch_tasks=3)
    graph = evaluate(net, opt, problem, "test", 8, 3, 4, False, torch.Generator().manual_seed(3), batch_tasks=3,
                     cuda_graph=True)
    assert graph["cuda_graph"] is True and eager["cuda_graph"] is False
    assert graph["acc"] == eager["acc"] and graph["ci95"] == eager["ci95"]
    assert [g.replays for g in emulated_graph.made] == [1, 0]
    assert [g.static[0].shape[1] for g in emulated_graph.made] == [3, 2]


def test_one_batching_reused_across_evaluations_records_once(emulated_graph):
    # As the periodic evaluation of a training run and the benchmark use it.
    net, opt = _net_and_opt("adam")
    problem = _problem()
    batching = EvalBatching(net, opt, problem, 3, cuda_graph=True)
    for seed in (1, 2):
        fresh = evaluate(net, opt, problem, "test", 3, 3, 4, False, torch.Generator().manual_seed(seed), batch_tasks=3)
        reused = evaluate(net, opt, problem, "test", 3, 3, 4, False, torch.Generator().manual_seed(seed),
                          batch_tasks=3, cuda_graph=True, batching=batching)
        assert reused["acc"] == fresh["acc"]
    assert len(emulated_graph.made) == 1 and emulated_graph.made[0].replays == 1
    with pytest.raises(ValueError, match=r"batching adapts 3 tasks at once \(cuda_graph=True\), the call asks for 4"):
        evaluate(net, opt, problem, "test", 3, 3, 4, False, torch.Generator(), batch_tasks=4, cuda_graph=True,
                 batching=batching)


def test_replays_restart_every_task_from_the_optimizer(emulated_graph):
    # A replay must not start from the previous batch's adapted rows: each call's
    # weights equal a fresh eager adaptation of the same tasks.
    net, opt = _net_and_opt("adam")
    problem = _problem()
    adapter = BatchedAdapter(net, opt, problem.loss, capture=True)
    eager = BatchedAdapter(net, opt, problem.loss)
    for seed in (1, 2, 3):
        drawn = _draw(problem, 3, iters=4, seed=seed)
        xs, ys = _inputs(problem, drawn)
        got = _weights(net, adapter.adapt(xs, ys), 3)
        want = _weights(net, eager.adapt(xs, ys), 3)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert len(emulated_graph.made) == 1 and emulated_graph.made[0].replays == 2


def test_recorded_anew_when_the_first_step_rule_changes(emulated_graph):
    # SGD with momentum: an optimizer that has not stepped yet adapts with torch's
    # first-step rule at step 0, which a graph holds fixed: after a step it is recorded again.
    net, opt = _net_and_opt("sgd", steps=0, momentum_sgd=True)
    problem = _problem()
    adapter = BatchedAdapter(net, opt, problem.loss, capture=True)
    xs, ys = _inputs(problem, _draw(problem, 3, iters=4))
    adapter.adapt(xs, ys)
    adapter.adapt(xs, ys)
    opt.zero_grad()
    net(torch.rand(4, 1, 8, 8)).sum().backward()
    opt.step()
    rows = adapter.adapt(xs, ys)
    assert len(emulated_graph.made) == 2 and emulated_graph.made[0].replays == 1
    for g, w in zip(_weights(net, rows, 3), _weights(net, BatchedAdapter(net, opt, problem.loss).adapt(xs, ys), 3)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_beyond_the_graph_limit_other_shapes_run_eagerly(emulated_graph, monkeypatch):
    monkeypatch.setattr(batched_adapter, "MAX_GRAPHS", 1)
    net, opt = _net_and_opt("adam")
    problem = _problem()
    adapter = BatchedAdapter(net, opt, problem.loss, capture=True)
    adapter.adapt(*_inputs(problem, _draw(problem, 3, iters=4)))
    rows = adapter.adapt(*_inputs(problem, _draw(problem, 2, iters=4)))
    assert len(emulated_graph.made) == 1 and rows[0].tasks.shape[0] == 2


# ---------------------------------------------------------------- refusals


def test_capture_on_the_cpu_is_refused_saying_why():
    net, opt = _net_and_opt("adam", steps=0)
    problem = _problem()
    with pytest.raises(ValueError, match="capture=True is impossible here: CUDA graphs need CUDA tensors"):
        BatchedAdapter(net, opt, problem.loss, capture=True)
    with pytest.raises(ValueError, match="capture must be True or False"):
        BatchedAdapter(net, opt, problem.loss, capture="auto")
    with pytest.raises(ValueError, match="--eval-cuda-graph is impossible here: CUDA graphs need CUDA tensors"):
        EvalBatching(net, opt, problem, 4, cuda_graph=True)
    with pytest.raises(ValueError, match="needs --eval-batch-tasks of 2 or more, got 1"):
        EvalBatching(net, opt, problem, 1, cuda_graph=True)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_cli_eval_cuda_graph_without_cuda_is_one_line(command, tmp_path, capsys):
    from reptile_fused.app.cli import main

    args = (["train", "--dataset", "sine", "--out", str(tmp_path / "run")] if command == "train"
            else ["eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert main([*args, "--device", "cpu", "--eval-cuda-graph", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reptile-fused {command}: error: --eval-cuda-graph needs a CUDA device, got cpu"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("transductive", [False, True])
@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_graph_replays_equal_eager_batched_and_sequential_on_float64(inner, transductive, capturable_backend):
    # float64 (no TF32, no reduced-precision convolution): the replayed graph, the eager
    # batched adaptation and the sequential protocol score the same tasks identically.
    net, opt = _net_and_opt(inner, torch.float64, "cuda", capturable_backend, momentum_sgd=inner == "sgd")
    problem = _problem(dtype=torch.float64)
    on_gpu = _OnDevice(problem, "cuda")
    results = [evaluate(net, opt, on_gpu, "test", 8, 3, 6, transductive, torch.Generator().manual_seed(4),
                        batch_tasks=bt, cuda_graph=graph)
               for bt, graph in ((1, False), (3, False), (3, True))]
    assert results[2]["cuda_graph"] is True
    assert results[0]["acc"] == results[1]["acc"] == results[2]["acc"]
    # The adapted weights themselves, after a replay (the second call on the same shape).
    adapter = BatchedAdapter(net, opt, on_gpu.loss, capture=True)
    for seed in (5, 6):
        drawn = [(_OnDevice.task(t, "cuda"), o) for t, o in _draw(problem, 3, iters=6, seed=seed)]
        rows = adapter.adapt(*_inputs(on_gpu, drawn, "cuda"))
        torch.cuda.synchronize()
        want, _ = _batched(net, opt, on_gpu, drawn, transductive)
        for g, w in zip(_weights(net, rows, 3), want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    (entry,) = adapter._graphs.values()
    assert entry[0] is rows  # replayed into the recorded rows, not recorded again
    seq, _ = _sequential(net, opt, on_gpu, drawn, transductive)
    for g, w in zip(_weights(net, rows, 3), seq):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_graph_on_cuda_refuses_the_reference_backend():
    net, opt = _net_and_opt("adam", device="cuda", backend="reference", steps=0)
    with pytest.raises(ValueError, match="backend 'reference' reads the learning rate"):
        EvalBatching(net, opt, _problem(), 4, cuda_graph=True)


class _OnDevice:
    """A problem whose tasks are moved to ``device``."""

    def __init__(self, problem, device):
        self.p, self.device = problem, device
        self.kind, self.metric, self.loss, self.score = problem.kind, problem.metric, problem.loss, problem.score

    @staticmethod
    def task(t, device):
        from reptile_fused.data import Task

        return Task(t.support_x.to(device), t.support_y.to(device), t.query_x.to(device), t.query_y.to(device))

    def eval_task(self, split, generator):
        return self.task(self.p.eval_task(split, generator), self.device)


def test_trainer_refuses_a_graph_it_cannot_record_before_training():
    from reptile_fused.app.train import Trainer

    with pytest.raises(ValueError, match="--eval-cuda-graph is impossible here: CUDA graphs need CUDA tensors"):
        Trainer(TrainConfig(dataset="sine", meta_iters=1), device="cpu", eval_batch_tasks=2, eval_cuda_graph=True,
                progress=False, curves=False)
