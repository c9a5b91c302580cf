"""Reptile must actually meta-learn: the paper's sine-wave toy problem, shortened for CI."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile_fused import reptile_adapt, reptile_train


def sine_tasks(seed, shots=10, queries=50):
    g = torch.Generator().manual_seed(seed)
    while True:
        amplitude = torch.empty(1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(1).uniform_(0.0, 2 * math.pi, generator=g)
        x = torch.empty(shots + queries, 1).uniform_(-5.0, 5.0, generator=g)
        y = amplitude * torch.sin(x + phase)
        yield x[:shots], y[:shots], x[shots:], y[shots:]


def sine_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def post_adaptation_mse(model, tasks, n_tasks=25):
    losses = []
    for _ in range(n_tasks):
        sx, sy, qx, qy = next(tasks)
        adapted = reptile_adapt(model, sx, sy, inner_lr=0.02, inner_steps=32, loss_fn=F.mse_loss)
        with torch.no_grad():
            losses.append(F.mse_loss(adapted(qx), qy).item())
    return sum(losses) / len(losses)


@pytest.fixture
def one_thread():
    # A 1-64-64-1 MLP is far too small for intra-op threads: on a busy 2-core
    # machine their spin-waiting makes each step tens of times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_meta_learned_init_adapts_better_than_random_init(one_thread):
    meta = reptile_train(
        sine_mlp(0), sine_tasks(1), meta_lr=0.1, inner_lr=0.02, inner_steps=5,
        num_iterations=1500, device="cpu", loss_fn=F.mse_loss, log_interval=0,
    )
    random_init = sine_mlp(0)
    meta_mse = post_adaptation_mse(meta, sine_tasks(2))
    random_mse = post_adaptation_mse(random_init, sine_tasks(2))
    assert meta_mse < 0.5 * random_mse, (meta_mse, random_mse)


@pytest.mark.parametrize("steps", [-1, 2.5, True], ids=["negative", "float", "bool"])
def test_reptile_adapt_refuses_a_step_count_it_would_reinterpret(steps):
    """inner_steps=-1 used to return the model unadapted."""
    x, y, _, _ = next(sine_tasks(0))
    with pytest.raises(ValueError, match="inner_steps must be an int >= 0"):
        reptile_adapt(sine_mlp(0), x, y, inner_steps=steps, loss_fn=F.mse_loss)


def test_reptile_adapt_zero_steps_is_the_unadapted_copy():
    model = sine_mlp(0)
    x, y, _, _ = next(sine_tasks(0))
    copy = reptile_adapt(model, x, y, inner_steps=0, loss_fn=F.mse_loss)
    assert copy is not model and all(torch.equal(a, b) for a, b in zip(copy.parameters(), model.parameters()))
