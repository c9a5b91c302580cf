"""GPU-marked twins of the checks the CPU suite makes (issue 13, section 2), on every
backend that runs on CUDA, plus the CUDA paths no other test value-checks.

Every test takes a ``device``: on the GPU (gpu-marked, selected by ``-m gpu``) it runs the
compiled kernels; the CPU parametrization runs the same test code (cpp CPU kernels,
Triton's interpreter) at small sizes, so the twins themselves are checked here.
"""

from __future__ import annotations

import pytest
import torch

from reptile_fused import available_backends, get_backend
from reptile_fused import reference as R

from .gpu_cases import (
    ADAM_VARIANTS,
    DTYPE_IDS,
    DTYPES,
    SGD_VARIANTS,
    assert_contract,
    check_all,
    clone_in_place,
    clones,
    flat,
    opmath,
    run_adam,
    run_all_ops,
    run_batched,
    run_sgd,
    run_task_end_and_meta_update,
)

GPU = pytest.mark.gpu
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]
BACKENDS = ("cpp", "triton")


def _cpu_subset(device, dtype, *rest):
    """The CPU parametrization only checks the twin code (the CPU suite checks the ops):
    float32 and bfloat16, and the first value of any other grid axis, are enough there."""
    if device == "cpu" and (dtype in (torch.float64, torch.float16) or any(rest)):
        pytest.skip("CPU run of a GPU twin: a subset of the grid")


def _backend(name: str, device: str) -> str:
    if name not in available_backends(device):
        if device == "cuda" and torch.cuda.is_available() and name == "cpp":
            # On a GPU machine the extension must have been built with CUDA: fail, do not hide it.
            from reptile_fused.backends import cpp

            pytest.fail(f"backend 'cpp' cannot run on CUDA: {cpp.unavailable_reason(torch.device('cuda'))}")
        pytest.skip(f"backend {name!r} is not available on {device}")
    return name


# ------------------------------------------------------------------ test_triton_ops twins, both backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", SGD_VARIANTS)
@pytest.mark.parametrize("lr_kind", ("python", "tensor", "tensor64"))
def test_sgd_variants(backend, device, dtype, variant, lr_kind):
    _cpu_subset(device, dtype, lr_kind != "tensor64")
    _backend(backend, device)
    run_sgd(backend, 1025, dtype, device, variant, lr_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ADAM_VARIANTS)
@pytest.mark.parametrize(("step", "step_kind", "lr_kind"), [(1, "python", "tensor"), (7, "tensor", "python"), (3, "tensor64", "tensor")])
def test_adam_variants(backend, device, dtype, variant, step, step_kind, lr_kind):
    _cpu_subset(device, dtype, step_kind != "tensor64")
    _backend(backend, device)
    run_adam(backend, 1025, dtype, device, variant, step, step_kind, lr_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", (1, 17, 1025))
def test_meta_ops(backend, device, dtype, size):
    _cpu_subset(device, dtype)
    _backend(backend, device)
    run_task_end_and_meta_update(backend, size, dtype, device, "python", n=1)
    run_task_end_and_meta_update(backend, size, dtype, device, "tensor", n=5)
    run_batched(backend, size, dtype, device, rows=1, write_back=True, kind="python")
    run_batched(backend, size, dtype, device, rows=5, write_back=False, kind="tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", (1, 3, 5))
def test_unaligned_views(backend, device, dtype, offset):
    """Buffers at odd element offsets into their storage: the unaligned (scalar) paths."""
    _cpu_subset(device, dtype, offset != 3)
    _backend(backend, device)
    assert clone_in_place(flat(8, dtype, device, offset=offset)).storage_offset() == offset
    run_all_ops(backend, 1025, dtype, device, offset=offset, seed=offset)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_float64_hyperparameters_are_not_rounded_to_float32(backend, device):
    B = get_backend(_backend(backend, device), device)
    param = torch.zeros(3, dtype=torch.float64, device=device)
    grad = torch.ones(3, dtype=torch.float64, device=device)
    B.sgd_step_(param, grad, None, 0.1)
    assert torch.equal(param, torch.full_like(param, -0.1))
    anchor = torch.ones(3, dtype=torch.float64, device=device)
    acc = torch.full((3,), 6.0, dtype=torch.float64, device=device)
    B.meta_update_(param, anchor, acc, 1 / 3, 3)
    assert torch.equal(param, torch.full_like(param, 1 + (1 / 3) * (6.0 / 3 - 1)))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_16bit_store_rounds_to_nearest_even(backend, device, dtype):
    """meta_update_ with meta_lr = 1, n = 1 stores acc itself, rounded to nearest even once."""
    B = get_backend(_backend(backend, device), device)
    gen = torch.Generator().manual_seed(6)
    acc = torch.randn(4099, generator=gen)
    # Exact ties between two 16-bit values (round to the even one), and the edges.
    bits = MANTISSA_BITS_16[dtype]
    ties = (1 + (2 * torch.arange(32) + 1) * 2.0 ** -(bits + 1)).float()
    acc[4 : 4 + 32] = ties
    acc[:4] = torch.tensor([float("inf"), -float("inf"), 3.4e38, 1e-40])
    acc = acc.to(device)
    anchor = torch.zeros(acc.numel(), dtype=dtype, device=device)
    param = torch.empty_like(anchor)
    B.meta_update_(param, anchor, acc.clone(), 1.0, 1)
    assert torch.equal(param, acc.to(dtype))


MANTISSA_BITS_16 = {torch.float16: 10, torch.bfloat16: 7}


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bfloat16", "float16"))
def test_16bit_values_round_trip(backend, device, dtype):
    B = get_backend(_backend(backend, device), device)
    finfo = torch.finfo(dtype)
    special = [0.0, -0.0, finfo.tiny, finfo.tiny / 8, -finfo.tiny / 2, finfo.max, -finfo.max, float("inf"), -float("inf")]
    anchor = torch.cat([torch.tensor(special), torch.randn(32)]).to(device=device, dtype=dtype)
    param = torch.empty_like(anchor)
    acc = torch.zeros(anchor.numel(), device=device)
    B.meta_update_(param, anchor, acc, 0.0, 1)
    finite = anchor.isfinite()
    assert torch.equal(param[finite], anchor[finite])
    assert param[~finite].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_reference(backend, device):
    B = get_backend(_backend(backend, device), device)
    param = torch.tensor([1.0, float("nan"), 2.0, 3.0], device=device)
    grad = torch.tensor([float("nan"), 1.0, 1.0, float("inf")], device=device)
    ea, eas, vmax = torch.zeros(4, device=device), torch.ones(4, device=device), torch.zeros(4, device=device)
    ref, out = clones(param, grad, ea, eas, vmax), clones(param, grad, ea, eas, vmax)
    R.adam_step_(*ref, 1, 0.1, amsgrad=True)
    B.adam_step_(*out, 1, 0.1, amsgrad=True)
    check_all(out, ref, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), backend)
    buf = torch.zeros(4, device=device)
    ref, out = clones(param, grad, buf), clones(param, grad, buf)
    R.sgd_step_(*ref, 0.1, momentum=0.9)
    B.sgd_step_(*out, 0.1, momentum=0.9)
    check_all(out, ref, ("param", "grad", "momentum_buffer"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_float32_division_is_correctly_rounded(backend, device):
    """meta_update_ and batched_meta_update_ divide by n: with anchor 0 and meta_lr 1 the
    result is the quotient itself, which must equal torch's correctly rounded one bit for
    bit (Triton's float32 '/' is approximate on a GPU, up to 2 ulp)."""
    B = get_backend(_backend(backend, device), device)
    size = 1 << 12 if device == "cpu" else 1 << 22
    gen = torch.Generator().manual_seed(3)
    acc = (torch.rand(size, generator=gen) * 2 - 1).exp().to(device) * 7
    for n in (3.0, 7.0, 10.0):
        param, anchor = torch.empty(size, device=device), torch.zeros(size, device=device)
        B.meta_update_(param, anchor, acc.clone(), 1.0, n)
        # Divided in float64 and rounded once: correctly rounded for float32 operands
        # (torch's CUDA `acc / n` multiplies by the reciprocal instead).
        expected = (acc.double() / n).float()
        bad = param != expected
        assert not bad.any(), f"{backend}: {int(bad.sum())} of {size} quotients acc/{n} not correctly rounded"
    rows = 3
    tasks = torch.stack([acc * (i + 1) for i in range(rows)])
    theta = torch.zeros(size, device=device)
    B.batched_meta_update_(theta, tasks.clone(), 1.0, write_back=False)
    total = tasks[0] + tasks[1] + tasks[2]
    assert torch.equal(theta, (total.double() / rows).float()), f"{backend}: batched mean not correctly rounded"


# ------------------------------------------------------------------ test_triton_optimizer twin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ("sgd-momentum", "adam-amsgrad"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
def test_optimizer_matches_reference(backend, device, config, dtype):
    import copy

    from reptile_fused.optimizer import ReptileOptimizer

    from .gpu_cases import assert_ulp_close

    _backend(backend, device)
    configs = {
        "sgd-momentum": dict(inner_optimizer="sgd", lr=0.05, meta_lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adam-amsgrad": dict(inner_optimizer="adam", lr=1e-2, meta_lr=0.7, betas=(0.0, 0.999), amsgrad=True),
    }
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(device, dtype)
    start = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model)

    def train(m, name):
        opt = ReptileOptimizer(m.parameters(), backend=name, **configs[config])
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for _task in range(3):
                slope = torch.randn(4, 1, generator=gen)
                with opt.task():
                    for _inner in range(3):
                        x = torch.randn(16, 4, generator=gen)
                        loss = torch.nn.functional.mse_loss(m(x.to(device, dtype)), (x @ slope).to(device, dtype))
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
            opt.meta_step()
        return [p.detach().clone() for p in m.parameters()]

    expected, got = train(model, "reference"), train(twin, backend)
    ulps = 8 if dtype == torch.float32 else 2
    for g, e in zip(got, expected):
        # cuBLAS and CPU matmuls differ from run to run only in association; both runs here
        # use the same device, so the gradients agree and the ops' rounding is what is compared.
        assert_ulp_close(g, e, ulps=ulps, atol=1e-6, what=f"{backend}/{config}/{dtype}")
    assert any(not torch.equal(e, s) for e, s in zip(expected, start))


# ------------------------------------------------------------------ graph capture with device scalars


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@GPU
def test_no_host_sync_and_replay_values(backend, dtype):
    """With every scalar on the device an op neither synchronises (the capture would fail)
    nor reads a stale value: each replay equals the reference with the scalars' current values."""
    B = get_backend(_backend(backend, "cuda"), "cuda")
    size = 50_001
    p0, g = flat(size, dtype, "cuda", seed=0), flat(size, dtype, "cuda", seed=1)
    m0, v0 = flat(size, dtype, "cuda", seed=2), flat(size, dtype, "cuda", seed=3, positive=True)
    anchor, acc0 = flat(size, dtype, "cuda", seed=4), flat(size, opmath(dtype), "cuda", seed=5)
    # Scalars in the opmath dtype: a float32 0.9 is not float64's 0.9.
    lr, step, meta_lr, n = (torch.tensor(v, device="cuda", dtype=opmath(dtype)) for v in (0.1, 1.0, 0.5, 2.0))
    p, m, v, acc = p0.clone(), m0.clone(), v0.clone(), acc0.clone()

    def body():
        B.adam_step_(p, g, m, v, None, step, lr)
        B.sgd_step_(p, g, m, lr, momentum=0.9)
        B.meta_update_(p, anchor, acc, meta_lr, n)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up: compiles and tunes outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for values in ((0.1, 1.0, 0.5, 2.0), (0.02, 7.0, 0.9, 5.0)):
        for t, val in zip((lr, step, meta_lr, n), values):
            t.fill_(val)
        for t, t0 in ((p, p0), (m, m0), (v, v0), (acc, acc0)):
            t.copy_(t0)
        graph.replay()
        rp, rm, rv, racc = p0.clone(), m0.clone(), v0.clone(), acc0.clone()
        R.adam_step_(rp, g, rm, rv, None, values[1], values[0])
        R.sgd_step_(rp, g, rm, values[0], momentum=0.9)
        R.meta_update_(rp, anchor, racc, values[2], values[3])
        torch.cuda.synchronize()
        for o, r, name in ((p, rp, "param"), (m, rm, "exp_avg/momentum"), (v, rv, "exp_avg_sq"), (acc, racc, "acc")):
            assert_contract(o, r, f"{backend} replay {values}: {name}")
