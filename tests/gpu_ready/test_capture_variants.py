"""Every Triton kernel variant a captured meta-iteration launches is compiled before the
capture begins (issue 13, section 2).

Triton compiles a variant (one set of constexpr flags) at its first launch, and CUDA
forbids that inside a graph capture.  ``BatchedReptile`` warms up by running the
iteration eagerly, then ``_prepare_capture`` launches on scratch buffers whatever the
recorded iteration will launch that the warm-up did not.  On the CPU the property is
checked by recording the variants the Triton launchers receive (under the interpreter);
on a GPU by capturing for real, on every capturable backend, and on a second GPU when
there is one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile_fused import available_backends
from reptile_fused.batched import BatchedReptile

triton_kernels = pytest.importorskip("reptile_fused.backends.triton.kernels")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _data(steps, n, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, n, 4, 3, generator=g)
    ys = torch.randn(steps, n, 4, 2, generator=g)
    return xs.to(device), ys.to(device)


CASES = [
    # The concrete trigger: momentum, one inner step, state carried across iterations.
    dict(inner_optimizer="sgd", momentum=0.9, reset_inner_state="never", steps=1),
    dict(inner_optimizer="sgd", momentum=0.9, reset_inner_state="never", steps=2),
    dict(inner_optimizer="sgd", momentum=0.9, reset_inner_state="task", steps=1),
    dict(inner_optimizer="sgd", momentum=0.0, reset_inner_state="never", steps=1),
    dict(inner_optimizer="sgd", momentum=0.9, nesterov=True, reset_inner_state="never", steps=3),
    dict(inner_optimizer="adam", reset_inner_state="never", steps=1),
    dict(inner_optimizer="adam", amsgrad=True, reset_inner_state="task", steps=2),
]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


class _Spy:
    """Records (kernel, constexpr flags) of every launch the Triton launchers make."""

    def __init__(self, monkeypatch):
        self.seen: set = set()
        real = triton_kernels._launch

        def spy(raw, tuned, n_elements, block, args, consts):
            self.seen.add((raw.fn.__name__ if hasattr(raw, "fn") else str(raw), tuple(sorted(consts.items(), key=str))))
            return real(raw, tuned, n_elements, block, args, consts)

        monkeypatch.setattr(triton_kernels, "_launch", spy)

    def take(self) -> set:
        out, self.seen = self.seen, set()
        return out


def _batched_cpu(case, n=3):
    from reptile_fused.backends import triton as T

    if T.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton backend cannot run on the CPU here (no interpreter)")
    kwargs = {k: v for k, v in case.items() if k != "steps"}
    br = BatchedReptile(_mlp(), n, loss_fn=F.mse_loss, lr=0.05, meta_lr=0.5, backend="triton", **kwargs)
    # What capture=True sets up on a GPU: lr, meta_lr and step as device tensors.
    br._use_device_scalars()
    return br


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_recorded_iteration_launches_only_variants_compiled_before_capture(case, monkeypatch):
    """The sequence CapturedIteration follows (warm-up, prepare, record), with the record
    replaced by an eager run whose launches are checked against those made before it."""
    br = _batched_cpu(case)
    xs, ys = _data(case["steps"], 3)
    spy = _Spy(monkeypatch)
    br._run_iteration(xs, ys, None)  # the warm-up
    br._prepare_capture(xs, ys, None)
    before = spy.take()
    for _ in range(2):  # what the graph records (and, for safety, one more iteration's worth)
        br._run_iteration(xs, ys, None)
        recorded = spy.take()
        assert recorded <= before, f"variants first launched inside the capture: {sorted(recorded - before)}"


def test_the_trigger_needs_the_preparation(monkeypatch):
    """Without _prepare_capture the issue's trigger does launch a new variant (the check
    above would catch a regression)."""
    br = _batched_cpu(CASES[0])
    xs, ys = _data(1, 3)
    spy = _Spy(monkeypatch)
    br._run_iteration(xs, ys, None)
    before = spy.take()
    br._run_iteration(xs, ys, None)
    new = spy.take() - before
    assert new and all(name == "_sgd_kernel" and ("FIRST_STEP", False) in flags for name, flags in new)


def test_prepare_leaves_the_real_buffers_alone(monkeypatch):
    br = _batched_cpu(CASES[0])
    xs, ys = _data(1, 3)
    br._run_iteration(xs, ys, None)
    snapshot = [t.clone() for g in br._groups for t in (g.theta.data, g.tasks, g.grad, *g.state.values())]
    br._prepare_capture(xs, ys, None)
    after = [t for g in br._groups for t in (g.theta.data, g.tasks, g.grad, *g.state.values())]
    for a, b in zip(snapshot, after):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- GPU


def _capturable():
    return [b for b in available_backends("cuda") if b in ("cpp", "triton")] if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_capture_and_replay_equal_eager(backend, case):
    """Captured replays equal eager iterations on every capturable backend, including the
    trigger (Triton, momentum, reset 'never', one inner step)."""
    if backend not in _capturable():
        pytest.skip(f"backend {backend!r} is not available on CUDA here")
    kwargs = {k: v for k, v in case.items() if k != "steps"}
    n, iters = 3, 4
    xs, ys = _data(case["steps"], n, "cuda")
    a, b = _mlp().cuda(), _mlp().cuda()
    common = dict(loss_fn=F.mse_loss, lr=0.05, meta_lr=0.5, backend=backend, **kwargs)
    eager = BatchedReptile(a, n, **common)
    graph = BatchedReptile(b, n, capture=True, **common)
    for t in range(iters):
        for br in (eager, graph):
            br.meta_iteration(xs * (1 + t / 10), ys)
    assert graph._graph is not None
    torch.cuda.synchronize()
    for pa, pb in zip(a.parameters(), b.parameters()):
        # lr as a float32 device tensor vs a Python float: Adam may differ in the last bits.
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_capture_and_ops_on_a_second_gpu(backend):
    """A model on cuda:1 while cuda:0 is current: the ops and the captured iteration run on
    the model's GPU (the Triton launchers and the capture switch to it)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    if backend not in _capturable():
        pytest.skip(f"backend {backend!r} is not available on CUDA here")
    from reptile_fused import get_backend
    from reptile_fused import reference as R

    torch.cuda.set_device(0)
    ops = get_backend(backend, torch.device("cuda:1"))
    d = torch.device("cuda:1")
    p, g, buf = (torch.randn(10_001, device=d) for _ in range(3))
    ref = [t.clone() for t in (p, g, buf)]
    ops.sgd_step_(p, g, buf, torch.tensor(0.1, device=d), momentum=0.9)
    R.sgd_step_(*ref, torch.tensor(0.1, device=d), momentum=0.9)
    from numerics import assert_contract

    for o, r in zip((p, g, buf), ref):
        assert_contract(o, r, f"{backend} sgd_step_ on cuda:1", backend)
    assert torch.cuda.current_device() == 0

    n = 3
    xs, ys = _data(2, n, d)
    a, b = _mlp().to(d), _mlp().to(d)
    common = dict(loss_fn=F.mse_loss, lr=0.05, meta_lr=0.5, backend=backend, momentum=0.9)
    eager, graph = BatchedReptile(a, n, **common), BatchedReptile(b, n, capture=True, **common)
    for _ in range(3):
        for br in (eager, graph):
            br.meta_iteration(xs, ys)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(d)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
