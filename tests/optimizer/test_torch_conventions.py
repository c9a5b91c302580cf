"""torch.optim conventions ReptileOptimizer keeps, or refuses clearly: nothing accepted and then silently different."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from reptile_fused import ReptileOptimizer, available_backends, reptile_train

BACKENDS = [b for b in available_backends("cpu") if b != "triton"] + (["triton"] if "triton" in available_backends("cpu") else [])


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def step(m: nn.Module, opt, x, y, scale: float = 1.0) -> None:
    opt.zero_grad()
    (((m(x) - y) ** 2).mean() * scale).backward()
    opt.step()


def flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


DATA = [(torch.randn(5, 4, generator=torch.Generator().manual_seed(i)), torch.randn(5, 2, generator=torch.Generator().manual_seed(100 + i))) for i in range(6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_a_failed_task_rolls_back_the_inner_state_too(inner, backend):
    kwargs = dict(momentum=0.9) if inner == "sgd" else dict(betas=(0.9, 0.999))
    results = []
    for with_failure in (False, True):
        m = mlp()
        opt = ReptileOptimizer(m.parameters(), inner_optimizer=inner, lr=0.01, meta_lr=0.5, backend=backend, **kwargs)
        with opt.task():
            step(m, opt, *DATA[0])
        if with_failure:
            with pytest.raises(RuntimeError, match="task failed"):
                with opt.task():
                    step(m, opt, *DATA[1], scale=float("nan"))  # NaN gradients poison momentum / moments
                    raise RuntimeError("task failed")
        with opt.task():
            step(m, opt, *DATA[2])
        opt.meta_step()
        results.append(flat(m))
    assert torch.isfinite(results[1]).all()
    assert torch.equal(results[0], results[1])


def test_a_parameter_frozen_at_construction_and_unfrozen_later_is_refused_at_step():
    m = mlp()
    m[0].weight.requires_grad_(False)
    opt = ReptileOptimizer(m.parameters(), lr=0.1)
    step(m, opt, *DATA[0])  # frozen: no gradient, nothing to say
    m[0].weight.requires_grad_(True)
    before = flat(m)
    with pytest.raises(RuntimeError, match=r"was frozen \(requires_grad=False\) when it was handed to this ReptileOptimizer"):
        step(m, opt, *DATA[1])
    assert torch.equal(flat(m), before)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_deepcopy_and_pickle_give_working_optimizers(inner, tmp_path):
    kwargs = dict(momentum=0.9) if inner == "sgd" else {}
    m = mlp()
    opt = ReptileOptimizer(m.parameters(), inner_optimizer=inner, lr=0.01, **kwargs)
    with opt.task():
        step(m, opt, *DATA[0])
    step_count = opt.tasks_in_meta_batch

    m2, opt2 = copy.deepcopy((m, opt))
    assert opt2.tasks_in_meta_batch == step_count
    assert all(p is q for p, q in zip(m2.parameters(), opt2.param_groups[0]["params"]))
    path = tmp_path / "opt.pkl"
    path.write_bytes(pickle.dumps(opt))
    opt3 = pickle.loads(path.read_bytes())
    for o, model in ((opt, m), (opt2, m2)):
        with o.task():
            step(model, o, *DATA[1])
        o.meta_step()
    assert torch.equal(flat(m), flat(m2))
    assert opt3.tasks_in_meta_batch == step_count
    with opt3.task():
        pass
    opt3.meta_step()
    alone = copy.deepcopy(opt)  # copied alone: it steps copies of the parameters, as torch's do
    assert all(p is not q for p, q in zip(alone.param_groups[0]["params"], m.parameters()))


def test_deepcopy_inside_a_task_is_refused_with_a_reason():
    m = mlp()
    opt = ReptileOptimizer(m.parameters())
    with opt.task():
        with pytest.raises(RuntimeError, match="inside task"):
            copy.deepcopy(opt)


def test_state_dict_hooks_fire():
    m = mlp()
    opt = ReptileOptimizer(m.parameters(), inner_optimizer="adam")
    step(m, opt, *DATA[0])
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", sd.get("extra"))))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert seen == ["pre", ("load_pre", 1), "load_post"]


def test_one_cycle_lr_cycles_the_inner_optimizer_s_own_momentum_only():
    p = [torch.zeros(3, requires_grad=True)]
    adam = ReptileOptimizer(p, inner_optimizer="adam", betas=(0.0, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(adam.meta_optimizer, max_lr=1.0, total_steps=10, cycle_momentum=False)
    for _ in range(3):
        sched.step()
    assert adam.param_groups[0]["betas"] == (0.0, 0.999)  # the meta step has no momentum to cycle
    assert "betas" not in adam.meta_optimizer.defaults and "momentum" not in adam.meta_optimizer.defaults
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(adam.meta_optimizer, max_lr=1.0, total_steps=10)
    sgd = ReptileOptimizer([torch.zeros(3, requires_grad=True)], inner_optimizer="sgd", momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.1, total_steps=10)
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.95)  # cycled, as with torch.optim.SGD
    assert "betas" not in sgd.param_groups[0]
    cyc = ReptileOptimizer([torch.zeros(3, requires_grad=True)], inner_optimizer="sgd", momentum=0.9)
    torch.optim.lr_scheduler.CyclicLR(cyc, base_lr=0.01, max_lr=0.1, step_size_up=2)
    assert cyc.param_groups[0]["momentum"] == pytest.approx(0.9)  # CyclicLR starts at max_momentum
    assert "betas" not in cyc.param_groups[0]


def test_meta_optimizer_shows_only_the_meta_step_size():
    opt = ReptileOptimizer([torch.zeros(3, requires_grad=True)], inner_optimizer="adam", meta_lr=0.7)
    (group,) = opt.meta_optimizer.param_groups
    assert dict((k, group[k]) for k in group if k != "params") == {"lr": 0.7}
    torch.optim.lr_scheduler.LinearLR(opt.meta_optimizer, 1.0, 0.5, total_iters=2)
    assert set(k for k in group if k != "params") == {"lr", "initial_lr"}
    assert opt.param_groups[0]["initial_meta_lr"] == 0.7 and "initial_lr" not in opt.param_groups[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_exposes_per_parameter_views_like_torch(backend):
    ours, theirs = mlp(), mlp()
    opt = ReptileOptimizer(ours.parameters(), inner_optimizer="adam", betas=(0.9, 0.999), amsgrad=True, backend=backend)
    ref = torch.optim.Adam(theirs.parameters(), amsgrad=True, foreach=False)
    # Every parameter has its entry from the start (torch's appear at the first step),
    # holding what torch starts from: step 0, zero moments.
    assert len(opt.state) == len(list(ours.parameters()))
    assert all(e["step"].item() == 0 and not e["exp_avg"].any() for e in opt.state.values())
    for x, y in DATA[:3]:
        step(ours, opt, x, y)
        step(theirs, ref, x, y)
    assert len(opt.state) == len(ref.state)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        mine, torch_state = opt.state[p], ref.state[q]
        assert set(mine) == set(torch_state)
        for key in torch_state:
            torch.testing.assert_close(mine[key], torch_state[key], rtol=0, atol=0 if backend != "triton" else 1e-6)
    p = next(ours.parameters())
    opt.state[p] = {"exp_avg": torch.zeros_like(p), "step": torch.tensor(7.0)}
    assert opt.state[p]["step"].item() == 7.0 and not opt.state[p]["exp_avg"].any()
    assert opt.state_dict()["state"][0]["step"] == 7


def test_running_stat_normalisation_is_announced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    tasks = iter([(torch.randn(6, 3), torch.randint(0, 2, (6,)), torch.randn(6, 3), torch.randint(0, 2, (6,)))] * 4)
    with pytest.warns(UserWarning, match="tracks running statistics: ReptileOptimizer.task\\(\\) restores the parameters only"):
        reptile_train(model, tasks, num_iterations=2, meta_batch_size=1, inner_steps=1, batched=False)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    tasks = iter([(torch.randn(6, 3), torch.randint(0, 2, (6,)), torch.randn(6, 3), torch.randint(0, 2, (6,)))] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reptile_train(model, tasks, num_iterations=2, meta_batch_size=1, inner_steps=1, batched=False)


def test_a_second_optimizer_over_the_same_parameters_is_named_as_the_cause():
    m = mlp()
    first = ReptileOptimizer(m.parameters())
    ReptileOptimizer(m.parameters())
    with pytest.raises(RuntimeError, match="re-packed into the flat buffer of another optimizer"):
        step(m, first, *DATA[0])
    moved = mlp()
    opt = ReptileOptimizer(moved.parameters())
    moved.double()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        step(moved, opt, DATA[0][0].double(), DATA[0][1].double())


def test_repr_names_the_inner_optimizer_and_the_backend():
    text = repr(ReptileOptimizer(mlp().parameters(), inner_optimizer="adam", backend="reference", meta_lr=0.3))
    assert "inner_optimizer='adam'" in text and "backends=['reference']" in text and "meta_lr: 0.3" in text


# ---------------------------------------------------------------------- frozen after construction (issue 24)


@pytest.mark.parametrize("inner, kwargs", [
    ("sgd", dict(momentum=0.9, weight_decay=0.1)),
    ("adam", dict(betas=(0.9, 0.999), weight_decay=0.1)),
], ids=["sgd-momentum-wd", "adam-wd"])
def test_a_layer_frozen_after_construction_stays_put_like_torch(inner, kwargs):
    """requires_grad_(False) after the optimizer exists (fine-tuning's usual pattern): its
    flat-buffer gradient view stays attached, but autograd no longer fills it, so it used
    to keep moving through momentum and weight decay; torch.optim leaves it alone."""
    fused, plain = mlp(), mlp()
    opt = ReptileOptimizer(fused.parameters(), inner_optimizer=inner, lr=0.1, **kwargs)
    ref = (torch.optim.SGD if inner == "sgd" else torch.optim.Adam)(plain.parameters(), lr=0.1, foreach=False,
                                                                     **kwargs)
    for k, (x, y) in enumerate(DATA):
        if k == 2:
            fused[0].requires_grad_(False)
            plain[0].requires_grad_(False)
            frozen = fused[0].weight.detach().clone()
        step(fused, opt, x, y)
        step(plain, ref, x, y)
    assert torch.equal(fused[0].weight, frozen)
    torch.testing.assert_close(flat(fused), flat(plain), rtol=1e-6, atol=1e-7)
    # Unfrozen again, it trains on.
    fused[0].requires_grad_(True)
    step(fused, opt, *DATA[0])
    assert not torch.equal(fused[0].weight, frozen)


def test_a_layer_frozen_after_construction_does_not_move_with_the_meta_step():
    model = mlp()
    opt = ReptileOptimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    step(model, opt, *DATA[0])  # momentum built up
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    for x, y in DATA[1:4]:
        with opt.task():
            step(model, opt, x, y)
    opt.meta_step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))


def test_a_layer_frozen_after_construction_gets_no_meta_gradient():
    model = mlp()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    model[0].requires_grad_(False)
    for x, y in DATA[:2]:
        with opt.task():
            step(model, opt, x, y)
    opt.meta_gradient()
    assert model[0].weight.grad is None and model[2].weight.grad is not None
