"""BatchedReptile against the sequential ReptileOptimizer, its errors, and CUDA-graph replay."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile_fused import ReptileOptimizer, available_backends
from reptile_fused.batched import BatchedReptile, NotBatchableError

from reptile_fused.models import OmniglotNet

# The conv net costs real CPU time; one thread avoids oversubscribing a busy machine.
torch.set_num_threads(1)

CPU_BACKENDS = available_backends("cpu")

# Tolerances of batched vs sequential, float32.  vmap evaluates the n tasks with
# batched kernels (bmm for linear layers, one grouped convolution for conv layers)
# whose float32 sums are associated differently from the per-task kernels; measured
# worst case over these tests: 6e-8 absolute on the MLP, 4e-7 on the conv net.
SGD_TOL = dict(rtol=1e-5, atol=1e-6)
ADAM_TOL = SGD_TOL  # on the (smooth) MLP Adam stays as close as SGD
# Adam on a ReLU/BatchNorm net is ill-conditioned in float32: its update is about
# lr * sign(g) wherever |g| >> eps, so entries whose gradient is near zero, or flips
# as a ReLU crosses zero, move by up to ±lr on a rounding difference.  Per element the
# two modes then differ by up to a few 1e-4 (lr = 0.01) in a handful of entries, in
# sequential mode against itself just as well: perturbing θ by 1e-7 relative moves
# the sequential result by 2e-3 to 0.3 of its distance travelled, batched vs
# sequential differ by 3e-5 to 3e-4 of it.  So the conv net's Adam check is on the
# whole parameter vector: |θ_batched - θ_sequential| <= 2e-3 |θ_sequential - θ_0|.
ADAM_CONV_RTOL = 2e-3


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def conv(seed=0, conv_bias=True):
    """The paper's Omniglot net (5-way, 28x28).  ``conv_bias=False`` freezes the conv
    biases at their initial zero: BatchNorm makes their gradient zero in exact
    arithmetic, rounding noise in float32, which Adam would amplify to ±lr steps."""
    torch.manual_seed(seed)
    model = OmniglotNet(5)
    if not conv_bias:
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.bias.requires_grad_(False)
    return model


def first_conv(model):
    return model.features[0].weight


def regression_data(iters, steps, n, batch=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(iters, steps, n, batch, 3, generator=g, dtype=dtype)
    ys = torch.randn(iters, steps, n, batch, 2, generator=g, dtype=dtype)
    return xs, ys


def omniglot_data(iters, steps, n, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(iters, steps, n, batch, 1, 28, 28, generator=g)
    ys = torch.randint(0, 5, (iters, steps, n, batch), generator=g)
    return xs, ys


def run_sequential(model, xs, ys, loss_fn, **opt_kwargs):
    """The same tasks through ReptileOptimizer: task i of iteration t sees xs[t, s, i] at step s."""
    opt = ReptileOptimizer(model.parameters(), **opt_kwargs)
    iters, steps, n = xs.shape[:3]
    for t in range(iters):
        for i in range(n):
            with opt.task():
                for s in range(steps):
                    opt.zero_grad()
                    loss_fn(model(xs[t, s, i]), ys[t, s, i]).backward()
                    opt.step()
        opt.meta_step()
    return opt


def run_batched(model, xs, ys, loss_fn, **kwargs):
    br = BatchedReptile(model, xs.shape[2], loss_fn=loss_fn, **kwargs)
    for t in range(xs.shape[0]):
        br.meta_iteration(xs[t], ys[t])
    return br


def assert_same_params(a, b, **tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m: f"{name}: {m}", **tol)


SGD_CASES = [
    dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.7),
    dict(inner_optimizer="sgd", lr=0.05, meta_lr=1.0, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(inner_optimizer="sgd", lr=0.05, meta_lr=0.5, momentum=0.5, dampening=0.2),
]
ADAM_CASES = [
    dict(inner_optimizer="adam", lr=0.01, meta_lr=0.5, betas=(0.0, 0.999)),
    dict(inner_optimizer="adam", lr=0.01, meta_lr=1.0, betas=(0.9, 0.99), amsgrad=True, weight_decay=1e-2),
]


def case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


# ---------------------------------------------------------------- batched == sequential


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("case", SGD_CASES + ADAM_CASES, ids=case_id)
def test_mlp_matches_sequential(case, n, backend):
    # Batched mode gives every task fresh inner state ("task"), which is sequential
    # reset_inner_state="task"; for plain SGD (stateless) any reset gives the same.
    xs, ys = regression_data(iters=3, steps=4, n=n)
    batched, sequential = mlp(), mlp()
    br = run_batched(batched, xs, ys, F.mse_loss, backend=backend, **case)
    run_sequential(sequential, xs, ys, F.mse_loss, backend="reference", reset_inner_state="task", **case)
    assert_same_params(batched, sequential, **(SGD_TOL if case["inner_optimizer"] == "sgd" else ADAM_TOL))
    # And the meta-weights moved: a test that compares two unchanged models proves nothing.
    assert not torch.equal(batched[0].weight, mlp()[0].weight)
    # Every task row holds the new θ, ready for the next meta-iteration.
    for g in br._groups:
        assert torch.equal(g.tasks, g.theta.data.expand_as(g.tasks))


@pytest.mark.parametrize("n", [1, 5])
def test_mlp_float64_matches_sequential_to_rounding(n):
    xs, ys = regression_data(iters=3, steps=3, n=n, dtype=torch.float64)
    batched, sequential = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    case = dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.7, momentum=0.9)
    run_batched(batched, xs, ys, F.mse_loss, backend="reference", **case)
    run_sequential(sequential, xs, ys, F.mse_loss, backend="reference", reset_inner_state="task", **case)
    assert_same_params(batched, sequential, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", [SGD_CASES[1], ADAM_CASES[0]], ids=case_id)
def test_n1_carried_state_is_sequential_never(case):
    # With one task per meta-batch, task slot 0 carrying its state across meta-iterations
    # is exactly the sequential default (state carried from task to task).
    xs, ys = regression_data(iters=3, steps=3, n=1)
    batched, sequential = mlp(), mlp()
    run_batched(batched, xs, ys, F.mse_loss, backend="reference", reset_inner_state="never", **case)
    run_sequential(sequential, xs, ys, F.mse_loss, backend="reference", reset_inner_state="never", **case)
    assert_same_params(batched, sequential, **(SGD_TOL if case["inner_optimizer"] == "sgd" else ADAM_TOL))
    # ... and it is not the fresh-state semantics (else the test could not tell them apart).
    fresh = mlp()
    run_batched(fresh, xs, ys, F.mse_loss, backend="reference", reset_inner_state="task", **case)
    assert not torch.allclose(fresh[0].weight, batched[0].weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n", [1, 5])
def test_omniglot_net_sgd_matches_sequential(n):
    xs, ys = omniglot_data(iters=2, steps=2, n=n)
    batched, sequential = conv(), conv()
    case = dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.5, momentum=0.9)
    run_batched(batched, xs, ys, F.cross_entropy, backend="auto", **case)
    run_sequential(sequential, xs, ys, F.cross_entropy, backend="auto", reset_inner_state="task", **case)
    assert_same_params(batched, sequential, **SGD_TOL)
    assert not torch.equal(first_conv(batched), first_conv(conv()))


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("n", [1, 5])
def test_omniglot_net_adam_matches_sequential(n):
    # Conv biases frozen: BatchNorm makes their gradient zero up to rounding noise,
    # which Adam turns into ±lr steps in either mode (see docs/batched.md).
    xs, ys = omniglot_data(iters=2, steps=2, n=n)
    batched, sequential = conv(conv_bias=False), conv(conv_bias=False)
    case = ADAM_CASES[0]
    run_batched(batched, xs, ys, F.cross_entropy, backend="auto", **case)
    run_sequential(sequential, xs, ys, F.cross_entropy, backend="auto", reset_inner_state="task", **case)
    start, b, s = flat_params(conv(conv_bias=False)), flat_params(batched), flat_params(sequential)
    moved = (s - start).norm()
    assert moved > 0.1
    assert (b - s).norm() <= ADAM_CONV_RTOL * moved
    # Per element: bounded by what the ill-conditioned entries can do (2 lr per step).
    assert (b - s).abs().max() <= 2 * case["lr"] * 2 * 2


def test_inner_step_and_meta_step_equal_meta_iteration():
    xs, ys = regression_data(iters=2, steps=3, n=4)
    a, b = mlp(), mlp()
    run_batched(a, xs, ys, F.mse_loss, lr=0.1, meta_lr=0.5, backend="reference")
    br = BatchedReptile(b, 4, lr=0.1, meta_lr=0.5, loss_fn=F.mse_loss, backend="reference")
    for t in range(2):
        for s in range(3):
            losses = br.inner_step(xs[t, s], ys[t, s])
            assert losses.shape == (4,)
        br.meta_step()
    assert_same_params(a, b, rtol=0, atol=0)


def test_inner_steps_argument_reuses_one_batch():
    xs, ys = regression_data(iters=1, steps=1, n=3)
    a, b = mlp(), mlp()
    BatchedReptile(a, 3, lr=0.1, loss_fn=F.mse_loss).meta_iteration(xs[0, 0], ys[0, 0], inner_steps=4)
    BatchedReptile(b, 3, lr=0.1, loss_fn=F.mse_loss).meta_iteration(xs[0].expand(4, *xs.shape[2:]), ys[0].expand(4, *ys.shape[2:]))
    assert_same_params(a, b, rtol=0, atol=0)


def test_each_inner_step_is_one_backend_call_over_all_tasks():
    model = mlp()
    br = BatchedReptile(model, 5, inner_optimizer="adam", lr=0.01, loss_fn=F.mse_loss, backend="reference")
    calls = []
    real = br._groups[0].backend

    class Counting:
        def adam_step_(self, param, *args, **kwargs):
            calls.append(("adam", param.numel()))
            return real.adam_step_(param, *args, **kwargs)

        def batched_meta_update_(self, theta, tasks, *args, **kwargs):
            calls.append(("meta", tasks.shape))
            return real.batched_meta_update_(theta, tasks, *args, **kwargs)

    br._groups[0].backend = Counting()
    xs, ys = regression_data(iters=1, steps=3, n=5)
    br.meta_iteration(xs[0], ys[0])
    P = br._groups[0].theta.numel
    assert calls == [("adam", 5 * P)] * 3 + [("meta", (5, P))]


def test_annealed_meta_lr_and_lr_match_sequential():
    xs, ys = regression_data(iters=4, steps=2, n=3)
    batched, sequential = mlp(), mlp()
    br = BatchedReptile(batched, 3, lr=0.1, meta_lr=1.0, loss_fn=F.mse_loss, backend="reference")
    opt = ReptileOptimizer(sequential.parameters(), lr=0.1, meta_lr=1.0, backend="reference")
    for t in range(4):
        eps, lr = 1.0 - t / 4, 0.1 * 0.5**t
        br.meta_lr, br.lr = eps, lr
        opt.param_groups[0]["meta_lr"], opt.param_groups[0]["lr"] = eps, lr
        br.meta_iteration(xs[t], ys[t])
        for i in range(3):
            with opt.task():
                for s in range(2):
                    opt.zero_grad()
                    F.mse_loss(sequential(xs[t, s, i]), ys[t, s, i]).backward()
                    opt.step()
        opt.meta_step()
    assert_same_params(batched, sequential, **SGD_TOL)


def test_theta_changed_between_meta_iterations_restarts_the_rows():
    xs, ys = regression_data(iters=2, steps=2, n=3)
    model, other = mlp(), mlp(seed=5)
    br = BatchedReptile(model, 3, lr=0.1, loss_fn=F.mse_loss, backend="reference")
    br.meta_iteration(xs[0], ys[0])
    model.load_state_dict(other.state_dict())  # writes into θ's flat buffer in place
    br.meta_iteration(xs[1], ys[1])
    fresh = mlp(seed=5)
    BatchedReptile(fresh, 3, lr=0.1, loss_fn=F.mse_loss, backend="reference").meta_iteration(xs[1], ys[1])
    assert_same_params(model, fresh, rtol=0, atol=0)


def test_frozen_parameters_are_used_and_left_alone():
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    twin = mlp()
    twin[0].weight.requires_grad_(False)
    xs, ys = regression_data(iters=2, steps=2, n=3)
    run_batched(model, xs, ys, F.mse_loss, lr=0.1, meta_lr=0.5, backend="reference")
    run_sequential(twin, xs, ys, F.mse_loss, lr=0.1, meta_lr=0.5, backend="reference")
    assert torch.equal(model[0].weight, frozen)
    assert_same_params(model, twin, **SGD_TOL)


def test_task_parameters_are_the_adapted_weights():
    xs, ys = regression_data(iters=1, steps=2, n=3)
    model = mlp()
    br = BatchedReptile(model, 3, lr=0.1, loss_fn=F.mse_loss, backend="reference")
    for s in range(2):
        br.inner_step(xs[0, s], ys[0, s])
    single = mlp()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for s in range(2):
        opt.zero_grad()
        F.mse_loss(single(xs[0, s, 2]), ys[0, s, 2]).backward()
        opt.step()
    for name, p in single.named_parameters():
        torch.testing.assert_close(br.task_parameters(2)[name], p, **SGD_TOL)
    # θ itself is untouched until the meta step.
    assert_same_params(model, mlp(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reset", ["task", "never"])
@pytest.mark.parametrize("case", [SGD_CASES[2], ADAM_CASES[1]], ids=case_id)
def test_device_scalars_of_capture_mode_match_python_scalars(case, reset, backend):
    # What a captured graph runs, minus the graph: lr, meta_lr and Adam's step count live
    # in 0-dim tensors that the backend reads, annealed between meta-iterations.  The GPU
    # tests replay it as a graph; this checks the bookkeeping where no GPU is.
    xs, ys = regression_data(iters=4, steps=3, n=3)
    a, b = mlp(), mlp()
    kwargs = dict(loss_fn=F.mse_loss, backend=backend, reset_inner_state=reset, **case)
    plain, tensors = BatchedReptile(a, 3, **kwargs), BatchedReptile(b, 3, **kwargs)
    tensors._use_device_scalars()
    for t in range(4):
        for br in (plain, tensors):
            br.meta_lr = case["meta_lr"] * (1 - t / 4)
            br.lr = case["lr"] * 0.8**t
            br.meta_iteration(xs[t], ys[t])
    assert_same_params(a, b, rtol=1e-6, atol=1e-7)
    g = tensors._groups[0]
    assert float(g.meta_lr_t) == pytest.approx(case["meta_lr"] * 0.25)
    if case["inner_optimizer"] == "adam":
        assert float(g.step_t) == (0 if reset == "task" else 12)


# ---------------------------------------------------------------- errors


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_running_stat_batch_norm_is_refused_naming_the_layer():
    model = conv()
    model.features[4] = nn.BatchNorm2d(64)  # tracks running statistics
    with pytest.raises(NotBatchableError, match=r"'features.4' \(BatchNorm2d\).*track_running_stats=False.*sequential"):
        BatchedReptile(model, 5)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # control flow on a value: vmap cannot batch it


def test_model_vmap_cannot_batch_names_the_layer_and_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), DataDependent(), nn.Linear(4, 2))
    snap = snapshot(model)
    br = BatchedReptile(model, 2, lr=0.1, loss_fn=F.mse_loss)
    xs, ys = regression_data(iters=1, steps=1, n=2)
    with pytest.raises(NotBatchableError, match=r"layer '1' \(DataDependent\).*sequential mode") as info:
        br.inner_step(xs[0, 0], ys[0, 0])
    assert info.value.__cause__ is not None  # the original vmap error stays attached
    br.meta_step()
    for p, s in zip(model.parameters(), snap):
        assert torch.equal(p, s)


def test_bad_shapes_and_arguments():
    model = mlp()
    br = BatchedReptile(model, 3, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match=r"task dimension first: shape \(3, ...\)"):
        br.inner_step(torch.randn(2, 6, 3), torch.randn(2, 6, 2))
    with pytest.raises(ValueError, match="inner_steps"):
        br.meta_iteration(torch.randn(3, 6, 3), torch.randn(3, 6, 2), inner_steps=-1)
    br.inner_step(torch.randn(3, 6, 3), torch.randn(3, 6, 2))
    with pytest.raises(RuntimeError, match="pending"):
        br.meta_iteration(torch.randn(1, 3, 6, 3), torch.randn(1, 3, 6, 2))
    with pytest.raises(ValueError, match="reset_inner_state.*use 'task'"):
        BatchedReptile(mlp(), 3, reset_inner_state="meta_step")
    with pytest.raises(ValueError, match="n_tasks"):
        BatchedReptile(mlp(), 0)
    with pytest.raises(ValueError, match="learning rate"):
        BatchedReptile(mlp(), 2, lr=-1.0)
    with pytest.raises(ValueError, match="meta_lr"):
        br.meta_lr = -0.5
    assert br.meta_lr == 1.0


def test_capture_on_the_cpu_is_a_clear_error_or_an_announced_eager_run():
    with pytest.raises(ValueError, match="capture=True is impossible here: CUDA graphs need CUDA tensors"):
        BatchedReptile(mlp(), 2, capture=True)
    with pytest.warns(UserWarning, match="runs eagerly: CUDA graphs need CUDA tensors"):
        br = BatchedReptile(mlp(), 2, loss_fn=F.mse_loss, lr=0.1, capture="auto")
    assert br.capture is False
    xs, ys = regression_data(iters=1, steps=2, n=2)
    a = mlp()
    run_batched(a, xs, ys, F.mse_loss, lr=0.1)
    br.meta_iteration(xs[0], ys[0])
    assert_same_params(br.model, a, rtol=0, atol=0)


# ---------------------------------------------------------------- reptile_train


def regression_tasks(count, batch=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, generator=g), torch.randn(batch, 2, generator=g),
         torch.randn(batch, 3, generator=g), torch.randn(batch, 2, generator=g))
        for _ in range(count)
    ]


class CountingBatched(BatchedReptile):
    made = 0

    def __init__(self, *args, **kwargs):
        CountingBatched.made += 1
        super().__init__(*args, **kwargs)


def train(model, monkeypatch, batched, n=4, iters=3, **kwargs):
    import reptile_fused.functional as functional

    monkeypatch.setattr(functional, "BatchedReptile", CountingBatched)
    # batched=None picks batched mode on CUDA only; let it choose on this CPU too.
    monkeypatch.setattr(functional, "AUTO_BATCHED_DEVICES", ("cuda", "cpu"))
    CountingBatched.made = 0
    logs = []
    train_kwargs = dict(meta_lr=0.5, inner_lr=0.1, inner_steps=3, num_iterations=iters, device="cpu",
                                meta_batch_size=n, loss_fn=F.mse_loss, log_interval=2, log=lambda i, m: logs.append((i, m)))
    train_kwargs.update(kwargs)
    functional.reptile_train(model, regression_tasks(n * iters), batched=batched, **train_kwargs)
    return CountingBatched.made, logs


def test_reptile_train_batched_equals_sequential(monkeypatch):
    auto, forced, sequential = mlp(), mlp(), mlp()
    made_auto, logs_auto = train(auto, monkeypatch, None)
    made_forced, _ = train(forced, monkeypatch, True)
    made_seq, logs_seq = train(sequential, monkeypatch, False)
    assert (made_auto, made_forced, made_seq) == (1, 1, 0)
    assert_same_params(auto, sequential, **SGD_TOL)
    assert_same_params(forced, auto, rtol=0, atol=0)
    # Logged after adapting to the first task of the meta-batch, in both modes.
    assert [i for i, _ in logs_auto] == [i for i, _ in logs_seq] == [0, 2]
    for (_, a), (_, b) in zip(logs_auto, logs_seq):
        assert a["query_loss"] == pytest.approx(b["query_loss"], rel=1e-5)


def test_reptile_train_auto_is_sequential_on_the_cpu(monkeypatch):
    import reptile_fused.functional as functional

    assert functional.AUTO_BATCHED_DEVICES == ("cuda",)
    monkeypatch.setattr(functional, "BatchedReptile", CountingBatched)
    CountingBatched.made = 0
    functional.reptile_train(mlp(), regression_tasks(8), inner_lr=0.1, inner_steps=2, num_iterations=2, device="cpu",
                             meta_batch_size=4, loss_fn=F.mse_loss, log_interval=0)
    assert CountingBatched.made == 0


def test_reptile_train_keeps_carried_state_sequential(monkeypatch):
    model = mlp()
    made, _ = train(model, monkeypatch, None, inner_optimizer="adam")
    assert made == 0  # Adam's state carried from task to task: batched would change the result
    with pytest.raises(ValueError, match="reset_inner_state='task'"):
        train(mlp(), monkeypatch, True, inner_optimizer="adam")
    made, _ = train(mlp(), monkeypatch, None, inner_optimizer="adam", reset_inner_state="task")
    assert made == 1
    made, _ = train(mlp(), monkeypatch, None, n=1)
    assert made == 0


@pytest.mark.parametrize("batched", [False, True])
def test_reptile_train_says_when_the_sampler_runs_out(batched):
    from reptile_fused import reptile_train

    with pytest.raises(ValueError, match="task_sampler ran out in iteration 1: .* = 12 tasks"):
        reptile_train(mlp(), regression_tasks(7), inner_steps=1, num_iterations=3, device="cpu",
                      meta_batch_size=4, loss_fn=F.mse_loss, log_interval=0, batched=batched)


class Flip(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_reptile_train_falls_back_with_a_warning_when_vmap_cannot_batch(monkeypatch):
    model = nn.Sequential(nn.Linear(3, 4), Flip(), nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"runs sequentially: batched mode could not run.*'1' \(Flip\)"):
        train(model, monkeypatch, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(twin, monkeypatch, False)
    assert_same_params(model, twin, rtol=0, atol=0)
    with pytest.raises(NotBatchableError, match="Flip"):
        train(copy.deepcopy(twin), monkeypatch, True)


def test_reptile_train_running_stat_batch_norm(monkeypatch):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"runs sequentially: layer '1' \(BatchNorm1d\)"):
        made, _ = train(model, monkeypatch, None)
    assert made == 0
    with pytest.raises(NotBatchableError, match="track_running_stats=False"):
        train(model, monkeypatch, True)


# ---------------------------------------------------------------- GPU: CUDA graphs


@pytest.fixture
def exact_cudnn():
    """Same kernels in the runs a test compares: deterministic cuDNN algorithms, no TF32.
    Through cudnn.flags(), not attribute writes: torch.testing._internal, imported by the
    conformance tests in the same process, forbids those (disable_global_flags)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield


@pytest.mark.gpu
@pytest.mark.parametrize("case", [SGD_CASES[1], ADAM_CASES[0]], ids=case_id)
@pytest.mark.parametrize("reset", ["task", "never"])
@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_graph_replay_equals_eager_with_annealing(case, reset, algorithm, exact_cudnn, capturable_backend):
    backend = capturable_backend
    adam = case["inner_optimizer"] == "adam"
    iters, steps, n = 6, 3, 5
    xs, ys = omniglot_data(iters=iters, steps=steps, n=n, batch=10)
    xs, ys = xs.cuda(), ys.cuda()
    # Adam: conv biases frozen, as in test_omniglot_net_adam_matches_sequential.
    eager_model, graph_model = conv(conv_bias=not adam).cuda(), conv(conv_bias=not adam).cuda()
    kwargs = dict(loss_fn=F.cross_entropy, backend=backend, reset_inner_state=reset, algorithm=algorithm, **case)
    eager = BatchedReptile(eager_model, n, **kwargs)
    graph = BatchedReptile(graph_model, n, capture=True, **kwargs)
    for t in range(iters):
        for br in (eager, graph):
            br.meta_lr = case["meta_lr"] * (1 - t / iters)  # the paper's linear annealing of ε
            br.lr = case["lr"] * 0.9**t
            br.meta_iteration(xs[t], ys[t])
        assert graph._graph is not None
    torch.cuda.synchronize()
    start = flat_params(conv(conv_bias=not adam).cuda())
    g, e = flat_params(graph_model), flat_params(eager_model)
    assert (e - start).norm() > 0.1
    if adam:
        # The graph reads lr as a float32 device tensor, eager passes a Python float:
        # Adam's ill-conditioned entries may still tell the two apart (see ADAM_CONV_RTOL).
        assert (g - e).norm() <= ADAM_CONV_RTOL * (e - start).norm()
    else:
        assert_same_params(graph_model, eager_model, **SGD_TOL)


@pytest.mark.gpu
def test_graph_replay_is_one_replay_per_meta_iteration_and_rejects_new_shapes(capturable_backend):
    backend = capturable_backend
    xs, ys = omniglot_data(iters=3, steps=2, n=5, batch=10)
    model = conv().cuda()
    br = BatchedReptile(model, 5, lr=0.1, backend=backend, capture=True)
    br.meta_iteration(xs[0].cuda(), ys[0].cuda())
    graph = br._graph
    br.meta_iteration(xs[1].cuda(), ys[1].cuda())
    assert br._graph is graph  # replayed, not re-captured
    with pytest.raises(ValueError, match="captured for inputs.*fixed shapes"):
        br.meta_iteration(xs[2, :, :, :7].cuda(), ys[2, :, :, :7].cuda())


@pytest.mark.gpu
def test_graph_capture_auto_runs_new_shapes_eagerly_with_a_warning(capturable_backend):
    backend = capturable_backend
    xs, ys = omniglot_data(iters=2, steps=2, n=5, batch=10)
    a, b = conv().cuda(), conv().cuda()
    auto = BatchedReptile(a, 5, lr=0.1, backend=backend, capture="auto")
    eager = BatchedReptile(b, 5, lr=0.1, backend=backend)
    for br in (auto, eager):
        br.meta_iteration(xs[0].cuda(), ys[0].cuda())
    with pytest.warns(UserWarning, match="running eagerly"):
        auto.meta_iteration(xs[1, :, :, :7].cuda(), ys[1, :, :, :7].cuda())
    eager.meta_iteration(xs[1, :, :, :7].cuda(), ys[1, :, :, :7].cuda())
    assert_same_params(a, b, **SGD_TOL)


@pytest.mark.gpu
def test_batched_on_cuda_matches_sequential(exact_cudnn):
    # cuDNN convolutions use TF32 by default on Ampere and later: exact_cudnn switches it off.
    xs, ys = omniglot_data(iters=2, steps=3, n=5, batch=10)
    xs, ys = xs.cuda(), ys.cuda()
    batched, sequential = conv().cuda(), conv().cuda()
    case = dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.5, momentum=0.9)
    run_batched(batched, xs, ys, F.cross_entropy, **case)
    run_sequential(sequential, xs, ys, F.cross_entropy, reset_inner_state="task", **case)
    # cuDNN picks different algorithms for the grouped and the plain convolutions.
    assert_same_params(batched, sequential, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_capture_needs_a_device_reading_backend():
    with pytest.raises(ValueError, match="reads lr/meta_lr/step on the host"):
        BatchedReptile(mlp().cuda(), 2, backend="reference", capture=True)


# ---------------------------------------------------------------------- issue 24


class _Counting(nn.Module):
    """An MLP whose forward counts its calls in a buffer (an integer counter)."""

    def __init__(self, float_counter=False):
        super().__init__()
        self.net = mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float32 if float_counter else torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_a_buffer_forward_changes_is_updated_once_per_task_as_sequentially():
    """It used to be updated once per step (3 instead of 12)."""
    xs, ys = regression_data(1, 3, 4)
    seq, bat = _Counting(), _Counting()
    run_sequential(seq, xs, ys, F.mse_loss, lr=0.1)
    br = BatchedReptile(bat, 4, lr=0.1, loss_fn=F.mse_loss)
    for s in range(3):
        br.inner_step(xs[0, s], ys[0, s])
    br.meta_step()
    assert int(seq.calls) == int(bat.calls) == 12
    torch.testing.assert_close(bat.net[0].weight, seq.net[0].weight, **SGD_TOL)


def test_a_float_buffer_forward_changes_is_refused_and_left_as_it_was():
    xs, ys = regression_data(1, 1, 4)
    model = _Counting(float_counter=True)
    br = BatchedReptile(model, 4, lr=0.1, loss_fn=F.mse_loss)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NotBatchableError, match="changes its buffer 'calls' \\(torch.float32\\).*once per step"):
        br.inner_step(xs[0, 0], ys[0, 0])
    assert float(model.calls) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("bad, words", [
    ("feature-size", "mat1 and mat2 shapes cannot be multiplied"),
    ("x-dtype", "Double and Float"),
    ("y-batch", "xs[0] is (6, 3) torch.float32, ys[0] is (7, 2)"),
], ids=["feature-size", "x-dtype", "y-batch"])
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_input_mistakes_are_reported_as_such_not_as_not_batchable(bad, words):
    """An xs/ys shape or dtype mistake used to be a NotBatchableError ('use the sequential mode')."""
    xs, ys = regression_data(1, 1, 4)
    x, y = xs[0, 0], ys[0, 0]
    if bad == "feature-size":
        x = torch.randn(4, 6, 5)
    elif bad == "x-dtype":
        x = x.double()
    else:
        y = torch.randn(4, 7, 2)
    model = mlp()
    br = BatchedReptile(model, 4, lr=0.1, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="fails on task 0's batch alone, without vmap") as info:
        br.inner_step(x, y)
    assert not isinstance(info.value, NotBatchableError) and words in str(info.value)


@pytest.mark.parametrize("inner, kwargs", [("sgd", dict(momentum=0.9)), ("adam", dict(betas=(0.9, 0.99)))])
@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_state_dict_mid_iteration_continues_exactly(inner, kwargs, algorithm):
    """The per-task inner state (and, between inner steps, the task rows) round-trips:
    a BatchedReptile rebuilt from model.state_dict() and its state_dict() continues
    bit-exactly."""
    xs, ys = regression_data(3, 2, 4)
    opts = dict(inner_optimizer=inner, lr=0.05, meta_lr=0.7, loss_fn=F.mse_loss, reset_inner_state="never",
                algorithm=algorithm, **kwargs)
    whole, split = mlp(), mlp()
    a = BatchedReptile(whole, 4, **opts)
    b = BatchedReptile(split, 4, **opts)
    for t in range(3):
        for s in range(2):
            a.inner_step(xs[t, s], ys[t, s])
            b.inner_step(xs[t, s], ys[t, s])
            if (t, s) == (1, 0):  # between inner steps, state carried from iteration 0
                saved_model, saved = copy.deepcopy(split.state_dict()), b.state_dict()
                split = mlp(seed=5)
                split.load_state_dict(saved_model)
                b = BatchedReptile(split, 4, **opts)
                b.load_state_dict(saved)
        a.meta_step()
        b.meta_step()
    for p, q in zip(whole.parameters(), split.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_another_setup_whole():
    a = BatchedReptile(mlp(), 4, lr=0.1, momentum=0.9, reset_inner_state="never", loss_fn=F.mse_loss)
    xs, ys = regression_data(1, 1, 4)
    a.inner_step(xs[0, 0], ys[0, 0])
    saved = a.state_dict()
    for other, match in [
        (BatchedReptile(mlp(), 3, lr=0.1, momentum=0.9, reset_inner_state="never"), "n_tasks=4"),
        (BatchedReptile(mlp(), 4, inner_optimizer="adam", reset_inner_state="never"), "inner_optimizer='sgd'"),
        (BatchedReptile(nn.Sequential(nn.Linear(3, 2)), 4, lr=0.1, momentum=0.9, reset_inner_state="never"),
         "does not list this model's parameters"),
    ]:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(saved)
    bad = copy.deepcopy(saved)
    bad["hyper"]["lr"] = -1.0
    fresh = BatchedReptile(mlp(), 4, lr=0.1, momentum=0.9, reset_inner_state="never", loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="invalid learning rate"):
        fresh.load_state_dict(bad)
    assert fresh.lr == 0.1 and fresh.state_dict()["steps_pending"] == 0, "nothing changed"


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    """BatchedReptile could not be deep-copied or pickled."""
    import pickle

    xs, ys = regression_data(2, 2, 4)
    model = mlp()
    br = BatchedReptile(model, 4, lr=0.05, momentum=0.9, reset_inner_state="never", loss_fn=F.mse_loss)
    br.meta_iteration(xs[0], ys[0])
    br.inner_step(xs[1, 0], ys[1, 0])
    pair = (model, br)
    model2, br2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert br2.model is model2 and model2 is not model
    for b in (br, br2):
        b.inner_step(xs[1, 1], ys[1, 1])
        b.meta_step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_settings_are_checked_when_written():
    br = BatchedReptile(mlp(), 4, lr=0.1, loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        br.algorithm = "maml"
    with pytest.raises(ValueError, match="reset_inner_state must be one of"):
        br.reset_inner_state = "meta_step"
    for name in ("n_tasks", "inner_optimizer"):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(br, name, 2)
    with pytest.raises(ValueError, match="invalid meta_lr: inf"):
        br.meta_lr = float("inf")
    xs, ys = regression_data(1, 1, 4)
    br.inner_step(xs[0, 0], ys[0, 0])
    with pytest.raises(RuntimeError, match="inner step\\(s\\) pending: call meta_step\\(\\) first"):
        br.algorithm = "fomaml"
    br.meta_step()
    br.algorithm = "fomaml"
    assert copy.deepcopy(br).algorithm == "fomaml"
