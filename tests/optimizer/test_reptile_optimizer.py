"""ReptileOptimizer against an independent per-parameter implementation of Reptile."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile_fused import ReptileOptimizer
from reptile_loops import make_tasks, train


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def run_fused(model, tasks, **opt_kwargs):
    opt = ReptileOptimizer(model.parameters(), **opt_kwargs)
    train(model, opt, tasks)
    return opt


def run_per_parameter(model, tasks, inner_optimizer="sgd", lr=0.1, meta_lr=1.0, **inner_kwargs):
    """Reptile the obvious way: torch's own optimizer for the inner loop (its state carried
    across tasks), a dict of clones for θ, and the meta update written out per parameter."""
    params = list(model.parameters())
    if inner_optimizer == "sgd":
        inner = torch.optim.SGD(params, lr=lr, foreach=False, **inner_kwargs)
    else:
        inner = torch.optim.Adam(params, lr=lr, foreach=False, **inner_kwargs)
    for meta_batch in tasks:
        theta = [p.detach().clone() for p in params]
        adapted_sum = [torch.zeros_like(p) for p in params]
        for task in meta_batch:
            for x, y in task:
                inner.zero_grad()
                F.mse_loss(model(x), y).backward()
                inner.step()
            with torch.no_grad():
                for p, s, t in zip(params, adapted_sum, theta):
                    s += p
                    p.copy_(t)
        with torch.no_grad():
            for p, s, t in zip(params, adapted_sum, theta):
                p.copy_(t + meta_lr * (s / len(meta_batch) - t))


def assert_same_params(a, b, **tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=name, **tol)


CASES = [
    dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.7),
    dict(inner_optimizer="sgd", lr=0.05, meta_lr=1.0, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(inner_optimizer="sgd", lr=0.05, meta_lr=0.5, momentum=0.5, dampening=0.2),
    dict(inner_optimizer="adam", lr=0.01, meta_lr=0.5, betas=(0.0, 0.999)),
    dict(inner_optimizer="adam", lr=0.01, meta_lr=1.0, betas=(0.9, 0.99), amsgrad=True, weight_decay=1e-2),
]


@pytest.mark.parametrize("meta_batch", [1, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_per_parameter_reptile(case, meta_batch):
    tasks = make_tasks(3, meta_batch, 4)
    fused, plain = make_model(), make_model()
    run_fused(fused, tasks, backend="reference", **case)
    run_per_parameter(plain, tasks, **case)
    assert_same_params(fused, plain, rtol=1e-5, atol=1e-6)


def test_param_groups_have_their_own_hyperparameters():
    tasks = make_tasks(2, 3, 3)
    fused, plain = make_model(), make_model()
    f0, f2, f4 = fused[0], fused[2], fused[4]
    opt = ReptileOptimizer(
        [{"params": f0.parameters(), "lr": 0.2, "meta_lr": 0.5}, {"params": list(f2.parameters()) + list(f4.parameters())}],
        lr=0.05,
        meta_lr=1.0,
    )
    assert len(opt.flat_buffers) == 2
    train(fused, opt, tasks)
    # The same by hand, group by group.
    params = list(plain.parameters())
    lrs = [0.2, 0.2] + [0.05] * 4
    meta = [0.5, 0.5] + [1.0] * 4
    for meta_batch in tasks:
        theta = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        for task in meta_batch:
            for x, y in task:
                plain.zero_grad()
                F.mse_loss(plain(x), y).backward()
                with torch.no_grad():
                    for p, lr in zip(params, lrs):
                        p -= lr * p.grad
            with torch.no_grad():
                for p, s, t in zip(params, total, theta):
                    s += p
                    p.copy_(t)
        with torch.no_grad():
            for p, s, t, e in zip(params, total, theta, meta):
                p.copy_(t + e * (s / len(meta_batch) - t))
    assert_same_params(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_resume_mid_meta_batch_is_bit_exact(inner):
    kwargs = dict(inner_optimizer=inner, lr=0.05, meta_lr=0.8, momentum=0.9) if inner == "sgd" else dict(
        inner_optimizer=inner, lr=0.01, meta_lr=0.8, betas=(0.0, 0.999)
    )
    tasks = make_tasks(3, 4, 3)
    whole = make_model()
    run_fused(whole, tasks, **kwargs)

    first = make_model()
    opt = ReptileOptimizer(first.parameters(), **kwargs)
    checkpoint = None
    for it, meta_batch in enumerate(tasks):
        for t, task in enumerate(meta_batch):
            if it == 1 and t == 2:
                buf = io.BytesIO()
                torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
                checkpoint = buf.getvalue()
                break
            with opt.task():
                for x, y in task:
                    opt.zero_grad()
                    F.mse_loss(first(x), y).backward()
                    opt.step()
        else:
            opt.meta_step()
            continue
        break

    resumed = make_model(seed=99)
    opt = ReptileOptimizer(resumed.parameters(), **kwargs)
    saved = torch.load(io.BytesIO(checkpoint), weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert opt.tasks_in_meta_batch == 2
    for it, meta_batch in enumerate(tasks[1:], start=1):
        for t, task in enumerate(meta_batch):
            if it == 1 and t < 2:
                continue
            with opt.task():
                for x, y in task:
                    opt.zero_grad()
                    F.mse_loss(resumed(x), y).backward()
                    opt.step()
        opt.meta_step()
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_step_outside_task_is_plain_fine_tuning():
    fused, plain = make_model(), make_model()
    opt = ReptileOptimizer(fused.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, foreach=False)
    for x, y in make_tasks(1, 1, 5)[0][0]:
        for m, o in ((fused, opt), (plain, ref)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    assert_same_params(fused, plain, rtol=0, atol=0)


def test_flattening_keeps_the_model_working():
    model = make_model()
    x = torch.randn(4, 3)
    before = model(x).detach()
    state = copy.deepcopy(model.state_dict())
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    assert torch.equal(model(x), before)
    buf = opt.flat_buffers[0]
    for p in model.parameters():
        # p's memory is inside the flat buffer (p has a storage object of its own, so that
        # tools that look for tied weights by storage do not see every parameter as tied).
        start = buf.data.data_ptr()
        assert start <= p.data_ptr() < start + buf.data.numel() * buf.data.element_size()
        assert p.data_ptr() % (16 * 4) == buf.data.data_ptr() % (16 * 4)  # offsets aligned to 16 elements
    F.mse_loss(model(x), torch.zeros(4, 2)).backward()
    assert buf.grad.abs().sum() > 0, "autograd must accumulate straight into the flat gradient"
    model.load_state_dict(state)
    assert torch.equal(model(x), before)
    assert torch.equal(buf.data[: model[0].weight.numel()], state["0.weight"].reshape(-1))


def test_frozen_parameters_are_left_alone():
    model = make_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = ReptileOptimizer(model.parameters(), lr=0.5)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with opt.task():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    opt.meta_step()
    assert torch.equal(model[0].weight, frozen)
    assert sum(b.numel for b in opt.flat_buffers) < sum(p.numel() for p in model.parameters()) + 16 * 6


def test_none_grads_are_skipped_like_torch():
    fused, plain = make_model(), make_model()
    opt = ReptileOptimizer(fused.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, foreach=False)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for step in range(4):
        for m, o in ((fused, opt), (plain, ref)):
            o.zero_grad(set_to_none=True)
            # Only the last layer gets a gradient on odd steps.
            out = m(x) if step % 2 == 0 else m[4](m[3](m[2](m[1](m[0](x))).detach()))
            F.mse_loss(out, y).backward()
            o.step()
    assert_same_params(fused, plain, rtol=1e-6, atol=1e-7)


def test_gradients_replaced_from_elsewhere_are_used():
    fused, plain = make_model(), make_model()
    opt = ReptileOptimizer(fused.parameters(), lr=0.1)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1, foreach=False)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for m, o in ((fused, opt), (plain, ref)):
        m.zero_grad()  # nn.Module.zero_grad releases the grads: autograd allocates new ones
        F.mse_loss(m(x), y).backward()
        o.step()
    assert_same_params(fused, plain, rtol=0, atol=0)
    assert fused[0].weight.grad.data_ptr() == opt.flat_buffers[0].grad.data_ptr()


def test_meta_gradient_with_an_outer_optimizer_equals_meta_step():
    tasks = make_tasks(2, 3, 3)
    a, b = make_model(), make_model()
    run_fused(a, tasks, lr=0.1, meta_lr=0.3)
    opt = ReptileOptimizer(b.parameters(), lr=0.1)
    outer = torch.optim.SGD(b.parameters(), lr=0.3)
    for meta_batch in tasks:
        for task in meta_batch:
            with opt.task():
                for x, y in task:
                    opt.zero_grad()
                    F.mse_loss(b(x), y).backward()
                    opt.step()
        opt.meta_gradient()
        outer.step()
    assert_same_params(a, b, rtol=1e-5, atol=1e-6)


def test_meta_lr_anneals_with_a_standard_scheduler():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1, meta_lr=1.0)
    inner_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched = torch.optim.lr_scheduler.LinearLR(opt.meta_optimizer, start_factor=1.0, end_factor=0.0, total_iters=4)
    seen = []
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            seen.append(opt.param_groups[0]["meta_lr"])
            with opt.task():
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
            opt.meta_step()
            sched.step()
        inner_sched.step()
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("when", ["task", "meta_step"])
def test_inner_state_reset_options(when):
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), inner_optimizer="adam", lr=0.01, reset_inner_state=when)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for _ in range(2):
        with opt.task():
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.step()
    steps = opt.state_dict()["state"][0].get("step")
    # "task": the second task starts fresh, so two steps counted; "meta_step": carried, four.
    assert steps == (2 if when == "task" else 4)
    opt.meta_step()
    state = opt.state_dict()["state"]
    if when == "meta_step":  # every entry back to a never-stepped one: step 0, zero moments
        assert all(e["step"] == 0 and not e["exp_avg"].any() and not e["exp_avg_sq"].any() for e in state.values())
        assert len(state) == len(list(model.parameters()))
    else:
        assert state[0]["step"] == 2


def test_nan_gradients_propagate_like_torch():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    with opt.task():
        opt.zero_grad()
        model[0].weight.grad.fill_(float("nan"))
        opt.step()
        assert torch.isnan(model[0].weight).all()
    opt.meta_step()
    assert torch.isnan(model[0].weight).all()


# ---------------------------------------------------------------- bad input


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, snap):
    for p, s in zip(model.parameters(), snap):
        assert torch.equal(p, s)


def test_sparse_gradients_are_rejected_and_nothing_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 1)
    model = nn.ModuleList([lin, emb])
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    snap = snapshot(model)
    opt.zero_grad(set_to_none=True)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "param, error, match",
    [
        (torch.zeros(3, dtype=torch.complex64, requires_grad=True), TypeError, "complex"),
        (torch.zeros(3, dtype=torch.int64), TypeError, "floating point"),
    ],
)
def test_unsupported_parameters(param, error, match):
    with pytest.raises(error, match=match):
        ReptileOptimizer([param])


def test_parameters_on_several_devices_in_one_group():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="one device"):
        ReptileOptimizer([a, b])
    assert a.grad is None


def test_meta_step_before_any_task():
    opt = ReptileOptimizer(make_model().parameters())
    with pytest.raises(RuntimeError, match="before any task"):
        opt.meta_step()
    with pytest.raises(RuntimeError, match="before any task"):
        opt.meta_gradient()


def test_nested_tasks_and_meta_step_inside_a_task():
    model = make_model()
    opt = ReptileOptimizer(model.parameters())
    with opt.task():
        with pytest.raises(RuntimeError, match="nested"):
            with opt.task():
                pass
        with pytest.raises(RuntimeError, match="inside task"):
            opt.meta_step()


def test_a_failing_task_is_discarded_and_weights_restored():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.5)
    snap = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with opt.task():
            opt.zero_grad()
            F.mse_loss(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
            opt.step()
            raise ZeroDivisionError("the task fails")
    assert_unchanged(model, snap)
    assert opt.tasks_in_meta_batch == 0


def test_step_outside_task_while_a_meta_batch_is_open():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.5)
    with opt.task():
        pass
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="meta-batch is open"):
        opt.step()
    assert_unchanged(model, snap)


def test_state_dict_from_a_different_model_is_rejected_whole():
    small = make_model()
    opt_small = ReptileOptimizer(small.parameters(), lr=0.1, momentum=0.9)
    with opt_small.task():
        opt_small.zero_grad()
        F.mse_loss(small(torch.randn(4, 3)), torch.randn(4, 2)).backward()
        opt_small.step()
    saved = opt_small.state_dict()

    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = ReptileOptimizer(other.parameters(), lr=0.7, momentum=0.9)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="different model"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.7
    assert opt.state_dict()["reptile"] == before["reptile"]

    with pytest.raises(ValueError, match="inner_optimizer"):
        ReptileOptimizer(make_model().parameters(), inner_optimizer="adam").load_state_dict(saved)


def test_moving_the_model_after_creating_the_optimizer_is_detected():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    model.double()
    with pytest.raises(RuntimeError, match="no longer lives"):
        opt.step()
    with pytest.raises(RuntimeError, match="no longer lives"):
        with opt.task():
            pass


def test_bad_hyperparameters():
    params = make_model().parameters
    for kwargs, match in [
        (dict(lr=-1), "learning rate"),
        (dict(meta_lr=-0.1), "meta_lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(nesterov=True), "nesterov"),
        (dict(inner_optimizer="rmsprop"), "inner_optimizer"),
        (dict(reset_inner_state="sometimes"), "reset_inner_state"),
        (dict(backend="cuda-magic"), "unknown backend"),
    ]:
        with pytest.raises((ValueError, RuntimeError), match=match):
            ReptileOptimizer(params(), **kwargs)


# ---------------------------------------------------------------------- one validation path (issue 24)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(meta_lr=float("inf")), ValueError, "invalid meta_lr: inf"),
    (dict(meta_lr=float("nan")), ValueError, "invalid meta_lr: nan"),
    (dict(lr=float("inf")), ValueError, "invalid lr: inf"),
    (dict(maximize="no"), TypeError, "maximize must be True or False, got 'no'"),
    (dict(nesterov=1, momentum=0.9), TypeError, "nesterov must be True or False"),
    (dict(inner_optimizer="adam", amsgrad="yes"), TypeError, "amsgrad must be True or False"),
    (dict(check_finite="yes"), TypeError, "check_finite must be True or False"),
], ids=["meta_lr-inf", "meta_lr-nan", "lr-inf", "maximize-str", "nesterov-int", "amsgrad-str", "check_finite-str"])
def test_construction_refuses_non_finite_numbers_and_non_bool_switches(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReptileOptimizer(make_model().parameters(), **kwargs)


@pytest.mark.parametrize("key, value, match", [
    ("lr", -1.0, "param group 0: invalid learning rate: -1"),
    ("meta_lr", float("nan"), "param group 0: invalid meta_lr: nan"),
    ("maximize", "no", "param group 0: maximize must be True or False"),
    ("momentum", float("inf"), "param group 0: invalid momentum: inf"),
], ids=["lr-negative", "meta_lr-nan", "maximize-str", "momentum-inf"])
def test_load_state_dict_checks_hyperparameters_like_construction(key, value, match):
    """load_state_dict used to take lr=-1 and meta_lr=nan (so a checkpoint brought them in)."""
    opt = ReptileOptimizer(make_model().parameters(), lr=0.1, momentum=0.5)
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["meta_lr"] == 1.0, "nothing changed"


def test_meta_step_refuses_a_meta_lr_written_non_finite():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    before = snapshot(model)
    with opt.task():
        pass
    opt.param_groups[0]["meta_lr"] = float("inf")
    with pytest.raises(ValueError, match="invalid meta_lr: inf"):
        opt.meta_step()
    assert_unchanged(model, before)


def test_algorithm_is_checked_and_fixed_inside_a_meta_batch():
    """opt.algorithm could be set to 'maml' (and saved in the state dict), or switched
    inside an open meta-batch, a mix load_state_dict refuses."""
    opt = ReptileOptimizer(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        opt.algorithm = "maml"
    assert opt.algorithm == "reptile" and opt.state_dict()["reptile"]["algorithm"] == "reptile"
    with opt.task():
        with pytest.raises(RuntimeError, match="inside an open meta-batch"):
            opt.algorithm = "fomaml"
    with pytest.raises(RuntimeError, match="inside an open meta-batch.*Call meta_step\\(\\) first"):
        opt.algorithm = "fomaml"
    opt.meta_step()
    opt.algorithm = "fomaml"  # between meta-batches: fine
    assert opt.algorithm == "fomaml" and opt.state_dict()["reptile"]["algorithm"] == "fomaml"


def test_settings_fixed_at_construction_refuse_writes():
    opt = ReptileOptimizer(make_model().parameters(), lr=0.1)
    for name, value in (("inner_optimizer", "adam"), ("backend", "reference"), ("memory_format", None)):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(opt, name, value)
    with pytest.raises(ValueError, match="reset_inner_state must be one of"):
        opt.reset_inner_state = "sometimes"
    opt.reset_inner_state = "task"
    assert opt.reset_inner_state == "task" and opt.state_dict()["reptile"]["reset_inner_state"] == "task"


def test_settings_written_on_the_optimizer_reach_a_wrapper_that_copied_its_dict():
    """Lightning's LightningOptimizer copies the optimizer's __dict__: the settings that may
    change live in the shared meta-batch state, so the wrapper sees the change."""
    opt = ReptileOptimizer(make_model().parameters(), lr=0.1)
    wrapper = object.__new__(type("Wrapped", (type(opt),), {}))
    wrapper.__dict__ = dict(opt.__dict__)
    opt.algorithm = "fomaml"
    opt.reset_inner_state = "meta_step"
    assert (wrapper.algorithm, wrapper.reset_inner_state) == ("fomaml", "meta_step")


# ---------------------------------------------------------------------- check_finite (issue 24)


def test_check_finite_rolls_back_a_diverged_task_and_keeps_the_others():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1, momentum=0.9, check_finite=True)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with opt.task():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError, match="check_finite: the task's adapted weights hold nan or inf "
                                                 r"\(parameter 0 of param group 0, shape \(8, 3\)\).*rolled back"):
        with opt.task():
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            model[0].weight.grad[0, 0] = float("inf")
            opt.step()
    assert_unchanged(model, before)
    assert opt.tasks_in_meta_batch == 1
    after = opt.state_dict()
    for i, entry in state["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][i][k])), (i, k)
    opt.meta_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_check_finite_refuses_a_meta_step_that_overflows():
    model = make_model(dtype=torch.float16)
    opt = ReptileOptimizer(model.parameters(), lr=1.0, meta_lr=1e4, check_finite=True, backend="reference")
    x, y = torch.randn(4, 3, dtype=torch.float16), torch.randn(4, 2, dtype=torch.float16)
    before = snapshot(model)
    with opt.task():
        opt.zero_grad()
        (F.mse_loss(model(x), y) * 1e3).backward()
        opt.step()
    with pytest.raises(FloatingPointError, match="meta step's result holds nan or inf.*left as they were"):
        opt.meta_step()
    assert_unchanged(model, before)
    assert opt.tasks_in_meta_batch == 0, "the meta-batch is discarded"


def test_without_check_finite_nan_propagates_as_in_torch():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    with opt.task():
        opt.zero_grad()
        model[0].weight.grad[0, 0] = float("nan")
        opt.step()
    opt.meta_step()
    assert torch.isnan(model[0].weight[0, 0])


# ---------------------------------------------------------------------- parameters that left the buffer (issue 24)


def test_parameters_replaced_by_load_state_dict_assign_are_detected():
    """The README promises to detect parameters that left the flat buffer: after
    model.load_state_dict(sd, assign=True) the model computes with new tensors and would
    silently never train."""
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    sd = {k: v.clone() for k, v in make_model(seed=1).state_dict().items()}
    model.load_state_dict(sd, assign=True)
    with pytest.raises(RuntimeError, match=r"parameter 0 of shape \(8, 3\) was replaced in its module.*assign=True"):
        opt.step()
    with pytest.raises(RuntimeError, match="was replaced in its module"):
        with opt.task():
            pass
    # The usual load (copying into the buffer) is fine, and so is a new optimizer.
    other = make_model(seed=2)
    opt2 = ReptileOptimizer(other.parameters(), lr=0.1)
    other.load_state_dict(sd)
    opt2.step()
    opt3 = ReptileOptimizer(model.parameters(), lr=0.1)
    opt3.step()


def test_assigning_a_new_parameter_over_a_packed_one_is_detected():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    model[2].bias = nn.Parameter(torch.zeros_like(model[2].bias))
    with pytest.raises(RuntimeError, match="parameter 3 of shape \\(8,\\) was replaced"):
        opt.step()
