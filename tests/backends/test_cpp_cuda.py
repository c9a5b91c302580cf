"""CUDA-only behaviour of the cpp backend: CUDA-graph capture and replay of whole
meta-iterations with a step size that changes between replays, and one kernel
launch per op.  (The op-vs-reference cases on CUDA live in tests/ops/.)"""

from __future__ import annotations

import pytest
import torch

from numerics import assert_contract
from reptile_fused import reference as ref
from reptile_fused.backends import cpp

pytestmark = pytest.mark.gpu

P = 10_007  # odd: the vector path and the scalar tail both run
TASKS = 3
INNER = 2


def _state(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dev = "cuda"
    return {
        "theta": torch.randn(P, generator=gen).to(dtype).to(dev),
        "anchor": torch.empty(P, dtype=dtype, device=dev),
        "acc": torch.zeros(P, dtype=torch.float32 if dtype != torch.float64 else dtype, device=dev),
        "grad": torch.empty(P, dtype=dtype, device=dev),
        "exp_avg": torch.zeros(P, dtype=dtype, device=dev),
        "exp_avg_sq": torch.zeros(P, dtype=dtype, device=dev),
        "grads": torch.randn(TASKS, INNER, P, generator=gen).to(dtype).to(dev),
        "step": torch.zeros((), device=dev),
        "lr": torch.tensor(1e-2, device=dev),
        "n": torch.tensor(float(TASKS), device=dev),
    }


def _meta_iteration(backend, s, eps) -> None:
    """One Reptile meta-iteration over flat buffers: for every task, INNER Adam steps
    from θ, then task_end_; then the meta update with step size eps."""
    s["anchor"].copy_(s["theta"])
    for t in range(TASKS):
        for k in range(INNER):
            s["grad"].copy_(s["grads"][t, k])  # stands in for backward() writing the flat grad
            s["step"].add_(1)  # the step count lives on the device
            backend.adam_step_(
                s["theta"], s["grad"], s["exp_avg"], s["exp_avg_sq"], None, s["step"], s["lr"], beta1=0.0
            )
        backend.task_end_(s["theta"], s["anchor"], s["acc"])
    backend.meta_update_(s["theta"], s["anchor"], s["acc"], eps, s["n"])


def _clone(s):
    return {k: v.clone() for k, v in s.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_graph_replay_meta_iteration_with_changing_eps(dtype):
    start = _state(dtype)
    live = _clone(start)
    eps = torch.tensor(0.5, device="cuda")

    # Warm up on a side stream (as torch.cuda.graphs recommends), then restore the
    # starting state in place: the graph is bound to these very buffers.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _meta_iteration(cpp, live, eps)
    torch.cuda.current_stream().wait_stream(side)
    for k in live:
        live[k].copy_(start[k])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _meta_iteration(cpp, live, eps)

    want = _clone(start)
    for value in (0.5, 0.25, 1.0, 0.1):  # annealing: no re-capture
        # Each replay starts from the reference's state, so one iteration is compared
        # at a time and rounding differences cannot compound across iterations.
        for k in live:
            live[k].copy_(want[k])
        eps.fill_(value)
        graph.replay()
        _meta_iteration(ref, want, value)
        torch.cuda.synchronize()
        for k in ("theta", "exp_avg", "exp_avg_sq", "acc", "step"):
            assert_contract(live[k], want[k], f"{k} after replay with eps={value}")


def test_graph_replay_batched_meta_update():
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(P, generator=gen).cuda()
    tasks = torch.randn(5, P, generator=gen).cuda()
    eps = torch.tensor(0.5, device="cuda")
    want_theta, want_tasks = theta.clone(), tasks.clone()
    graph = torch.cuda.CUDAGraph()
    snapshot = (theta.clone(), tasks.clone())
    cpp.batched_meta_update_(theta, tasks, eps)  # warm-up
    theta.copy_(snapshot[0])
    tasks.copy_(snapshot[1])
    with torch.cuda.graph(graph):
        cpp.batched_meta_update_(theta, tasks, eps)
    for value in (0.5, 0.3):
        tasks.add_(torch.randn(5, P, generator=gen).cuda())  # the inner loops moved the copies
        want_tasks.copy_(tasks)
        want_theta.copy_(theta)
        eps.fill_(value)
        graph.replay()
        ref.batched_meta_update_(want_theta, want_tasks, value)
        assert_contract(theta, want_theta, f"theta, eps={value}")
        assert_contract(tasks, want_tasks, f"tasks, eps={value}")


def _kernel_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "flat_kernel" in e.name)


@pytest.mark.parametrize("size", [1, 4099, 2**22 + 3])
def test_one_kernel_launch_per_op(size):
    d = "cuda"
    p, g, m, v, a = (torch.randn(size, device=d) for _ in range(5))
    acc = torch.zeros(size, device=d)
    tasks = torch.randn(4, size, device=d)
    u, ups = torch.zeros(size, device=d), torch.zeros(4, size, device=d)
    calls = {
        "sgd_step_": lambda: cpp.sgd_step_(p, g, m, 0.1, momentum=0.9),
        "adam_step_": lambda: cpp.adam_step_(p, g, m, v.abs(), None, 2, 1e-3),
        "task_end_": lambda: cpp.task_end_(p, a, acc),
        "meta_update_": lambda: cpp.meta_update_(p, a, acc, 0.5, 2),
        "batched_meta_update_": lambda: cpp.batched_meta_update_(p, tasks, 0.5),
        # First-order MAML: recording or using the update is a store/load stream, not a pass.
        "sgd_step_ with update": lambda: cpp.sgd_step_(p, g, m, 0.1, momentum=0.9, update=u),
        "adam_step_ with update": lambda: cpp.adam_step_(p, g, m, v.abs(), None, 2, 1e-3, update=u),
        "task_end_ with update": lambda: cpp.task_end_(p, a, acc, u),
        "batched_meta_update_ with updates": lambda: cpp.batched_meta_update_(p, tasks, 0.5, updates=ups),
    }
    for name, fn in calls.items():
        assert _kernel_launches(fn) == 1, name


def test_no_host_sync_with_device_scalars():
    """With every scalar on the device, an op must not synchronise: capturing it in a
    graph would fail if it did (cudaErrorStreamCaptureUnsupported)."""
    d = "cuda"
    p, g, m, v = (torch.randn(1000, device=d) for _ in range(4))
    v = v.abs()
    step, lr = torch.tensor(1.0, device=d), torch.tensor(1e-3, device=d)
    cpp.adam_step_(p, g, m, v, None, step, lr)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cpp.adam_step_(p, g, m, v, None, step, lr)
        cpp.meta_update_(p, g, torch.zeros_like(p), lr, step)
    graph.replay()
    torch.cuda.synchronize()
