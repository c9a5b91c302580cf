"""GPU-only checks of the Triton backend: compiled kernels at large sizes, autotuning and
its cache, torch.compile(fullgraph=True) through the ops, and CUDA-graph replay with
changing scalar tensors.  Skipped without CUDA (tests/conftest.py); `make gpu-check`
runs them when a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from reptile_fused import reference as R  # noqa: E402
from numerics import DTYPES, assert_contract, dtype_id, opmath  # noqa: E402

pytestmark = pytest.mark.gpu



@pytest.fixture(scope="module")
def T():
    from reptile_fused.backends import triton as backend

    reason = backend.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"CUDA is here but the Triton backend is not: {reason}")
    return backend


@pytest.fixture(scope="module")
def K(T):
    from reptile_fused.backends.triton import kernels as triton_kernels

    assert not triton_kernels.interpreting(), "GPU tests must run compiled kernels, not the interpreter"
    return triton_kernels


def _randn(size, dtype, seed, positive=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(size, generator=gen, device="cuda", dtype=torch.float32)
    return (t.abs() if positive else t).to(dtype)


def _clones(*ts):
    return [None if t is None else t.clone() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size", (1, 4097, (1 << 20) + 3))
def test_compiled_ops_match_reference(T, size, dtype):
    p, g, b, m = (_randn(size, dtype, s) for s in range(4))
    v, vmax = _randn(size, dtype, 4, positive=True), _randn(size, dtype, 5, positive=True)
    lr = torch.tensor(0.05, device="cuda")

    ref, out = _clones(p, g, b), _clones(p, g, b)
    R.sgd_step_(*ref, lr, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True)
    T.sgd_step_(*out, lr, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True)
    for o, r, n in zip(out, ref, ("param", "grad", "buf")):
        assert_contract(o, r, f"sgd {n}")

    step = torch.tensor(5.0, device="cuda")
    ref, out = _clones(p, g, m, v, vmax), _clones(p, g, m, v, vmax)
    R.adam_step_(*ref, step, lr, weight_decay=0.01, amsgrad=True)
    T.adam_step_(*out, step, lr, weight_decay=0.01, amsgrad=True)
    for o, r, n in zip(out, ref, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")):
        assert_contract(o, r, f"adam {n}")

    acc = _randn(size, opmath(dtype), 6)
    ref, out = _clones(p, b, acc), _clones(p, b, acc)
    R.task_end_(*ref)
    T.task_end_(*out)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    R.meta_update_(*ref, 0.5, 3)
    T.meta_update_(*out, torch.tensor(0.5, device="cuda"), torch.tensor(3.0, device="cuda"))
    for o, r, n in zip(out, ref, ("param", "anchor", "acc")):
        assert_contract(o, r, f"meta_update {n}")

    tasks = torch.stack([_randn(size, dtype, 10 + i) for i in range(5)])
    ref, out = _clones(p, tasks), _clones(p, tasks)
    R.batched_meta_update_(*ref, 0.3)
    T.batched_meta_update_(*out, 0.3)
    assert_contract(out[0], ref[0], "batched theta")
    assert torch.equal(out[1], out[0].expand_as(out[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("size,offset", ((4097, 0), (4097, 1), ((1 << 20) + 3, 0), ((1 << 20) + 3, 1)))
def test_compiled_update_variants_match_reference(T, size, offset, dtype):
    """First-order MAML's update buffer on compiled, autotuned kernels (Adam's variant has
    its own pruned configurations), aligned and not."""

    def at(t):  # a copy `offset` elements into its allocation (unaligned for offset 1)
        base = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
        return base[offset:].copy_(t)

    p, g, b, m = (at(_randn(size, dtype, s)) for s in range(4))
    v, vmax = at(_randn(size, dtype, 4, positive=True)), at(_randn(size, dtype, 5, positive=True))
    u = at(torch.full((size,), 7.0, device="cuda", dtype=opmath(dtype)))
    lr = torch.tensor(0.05, device="cuda")

    ref, out = [at(t) for t in (p, g, b, u)], [at(t) for t in (p, g, b, u)]
    R.sgd_step_(*ref[:3], lr, momentum=0.9, weight_decay=0.01, update=ref[3])
    T.sgd_step_(*out[:3], lr, momentum=0.9, weight_decay=0.01, update=out[3])
    for o, r, n in zip(out, ref, ("param", "grad", "buf", "update")):
        assert_contract(o, r, f"sgd {n}")
    assert torch.equal(out[3], out[0].to(opmath(dtype)) - p.to(opmath(dtype)))

    step = torch.tensor(5.0, device="cuda")
    ref, out = [at(t) for t in (p, g, m, v, vmax, u)], [at(t) for t in (p, g, m, v, vmax, u)]
    R.adam_step_(*ref[:5], step, lr, weight_decay=0.01, amsgrad=True, update=ref[5])
    T.adam_step_(*out[:5], step, lr, weight_decay=0.01, amsgrad=True, update=out[5])
    # The update is the stored param minus the old one, exactly (the last assertion): a
    # 16-bit param within its 1-ulp contract moves the update by that ulp, which the
    # update's own float32 bound would call a failure.
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "update")
    for o, r, n in zip(out, ref, names[:5] if dtype in (torch.float16, torch.bfloat16) else names):
        assert_contract(o, r, f"adam {n}")
    assert torch.equal(out[5], out[0].to(opmath(dtype)) - p.to(opmath(dtype)))

    upd = at(_randn(size, opmath(dtype), 6) * 1e-2)
    acc = at(_randn(size, opmath(dtype), 7))
    ref, out = [at(t) for t in (p, b, acc, upd)], [at(t) for t in (p, b, acc, upd)]
    R.task_end_(*ref)
    T.task_end_(*out)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)

    tasks = torch.stack([_randn(size, dtype, 10 + i) for i in range(3)])
    updates = torch.stack([_randn(size, opmath(dtype), 20 + i) * 1e-2 for i in range(3)])
    ref, out = [at(p), tasks.clone()], [at(p), tasks.clone()]
    R.batched_meta_update_(*ref, 0.3, updates=updates)
    T.batched_meta_update_(*out, 0.3, updates=updates)
    assert_contract(out[0], ref[0], "batched theta")
    assert torch.equal(out[1], out[0].expand_as(out[1]))


@pytest.mark.parametrize("block", (128, 1024, 8192))
def test_fixed_blocks_match_reference(K, block):
    """Every block size the tuner may pick computes the same thing (tails included)."""
    size = 3 * block + 7
    p, g, b = (_randn(size, torch.bfloat16, s) for s in range(3))
    ref, out = _clones(p, g, b), _clones(p, g, b)
    R.sgd_step_(*ref, 0.1, momentum=0.9)
    K.sgd(*out, 0.1, None, 0.9, 0.0, 0.0, False, False, False, block=block)
    for o, r in zip(out, ref):
        assert_contract(o, r, f"block {block}")


def test_autotuning_applies_the_update_once_and_caches(T, K):
    """Tuning runs the in-place kernel many times: the result must still be one update,
    and a second call of the same shape must not tune again."""
    if len(K.TUNE_SPACE) < 2:
        pytest.skip("REPTILE_FUSED_TRITON_TUNE=single: one configuration, nothing is tuned or cached")
    tuner = K.AUTOTUNED["meta_update_"]
    size = 3 * 4096 + 11  # a length no other test uses, so this call tunes
    param, anchor = _randn(size, torch.float32, 0), _randn(size, torch.float32, 1)
    acc = _randn(size, torch.float32, 2)
    ref, out = _clones(param, anchor, acc), _clones(param, anchor, acc)
    before = len(tuner.cache)
    R.meta_update_(*ref, 0.5, 2)
    T.meta_update_(*out, 0.5, 2)
    for o, r in zip(out, ref):
        assert_contract(o, r, "first (tuning) call")
    assert len(tuner.cache) == before + 1
    chosen = dict(tuner.cache)
    out[2].copy_(acc)
    T.meta_update_(*out, 0.5, 2)
    assert dict(tuner.cache) == chosen, "same shape and dtype must reuse the tuned config"
    other = _randn(size + 1, torch.float32, 3)
    T.task_end_(other, other.clone(), torch.zeros_like(other))
    T.meta_update_(other, other.clone(), torch.ones_like(other), 0.5, 1)
    assert len(tuner.cache) == before + 2, "a new length tunes once more"


@pytest.mark.xfail(
    tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12),
    reason="torch 2.11's inductor fails on an int argument >= 2**31 of a user-defined Triton kernel (the "
    "float64 bit patterns): AttributeError: 'int' object has no attribute 'xreplace' (seen on the H200)",
    strict=True,
)
def test_torch_compile_fullgraph_traces_through_the_ops(T):
    """fullgraph=True fails on any graph break, so this proves torch.compile sees the ops."""

    def inner_then_meta(param, grad, buf, exp_avg, exp_avg_sq, anchor, acc, lr, step, meta_lr, n):
        T.sgd_step_(param, grad, buf, lr, momentum=0.9, nesterov=True)
        T.adam_step_(param, grad, exp_avg, exp_avg_sq, None, step, lr)
        T.task_end_(param, anchor, acc)
        T.meta_update_(param, anchor, acc, meta_lr, n)
        return param * 2

    torch._dynamo.reset()
    compiled = torch.compile(inner_then_meta, fullgraph=True)
    size = 10_003
    bufs = [_randn(size, torch.float32, s) for s in range(4)]
    bufs.insert(4, _randn(size, torch.float32, 4, positive=True))
    bufs.append(_randn(size, torch.float32, 5))  # anchor
    bufs.append(torch.zeros(size, device="cuda"))  # acc
    scalars = [torch.tensor(x, device="cuda") for x in (0.01, 3.0, 0.5, 1.0)]
    ref, out = _clones(*bufs), _clones(*bufs)
    p, g, b, m, v, anchor, acc = ref
    R.sgd_step_(p, g, b, scalars[0], momentum=0.9, nesterov=True)
    R.adam_step_(p, g, m, v, None, scalars[1], scalars[0])
    R.task_end_(p, anchor, acc)
    R.meta_update_(p, anchor, acc, scalars[2], scalars[3])
    ret = compiled(*out, *scalars)
    for o, r in zip(out, ref):
        assert_contract(o, r, "compiled")
    assert_contract(ret, ref[0] * 2, "compiled return")


def test_cuda_graph_replay_reads_changed_scalars(T):
    """Scalars as device tensors: a captured graph replays with their current values."""
    size = 50_001
    p0, g = _randn(size, torch.float16, 0), _randn(size, torch.float16, 1)
    m0, v0 = _randn(size, torch.float16, 2), _randn(size, torch.float16, 3, positive=True)
    anchor = _randn(size, torch.float16, 4)
    acc0 = _randn(size, torch.float32, 5)
    lr, step = torch.tensor(0.1, device="cuda"), torch.tensor(1.0, device="cuda")
    meta_lr, n = torch.tensor(0.5, device="cuda"), torch.tensor(2.0, device="cuda")
    p, m, v, acc = p0.clone(), m0.clone(), v0.clone(), acc0.clone()

    def body():
        T.adam_step_(p, g, m, v, None, step, lr)
        T.meta_update_(p, anchor, acc, meta_lr, n)

    # Warm up (and autotune) outside the capture: tuning cannot run inside one.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    for lr_v, step_v, meta_lr_v, n_v in ((0.1, 1.0, 0.5, 2.0), (0.02, 7.0, 0.9, 5.0)):
        for t, val in ((lr, lr_v), (step, step_v), (meta_lr, meta_lr_v), (n, n_v)):
            t.fill_(val)
        for t, t0 in ((p, p0), (m, m0), (v, v0), (acc, acc0)):
            t.copy_(t0)
        graph.replay()
        rp, rm, rv, racc = p0.clone(), m0.clone(), v0.clone(), acc0.clone()
        R.adam_step_(rp, g, rm, rv, None, step_v, lr_v)
        R.meta_update_(rp, anchor, racc, meta_lr_v, n_v)
        for o, r, name in ((p, rp, "param"), (m, rm, "exp_avg"), (v, rv, "exp_avg_sq"), (acc, racc, "acc")):
            assert_contract(o, r, f"replay lr={lr_v} step={step_v}: {name}")


def test_offsets_beyond_int32(T):
    """A buffer longer than 2**31 elements: offsets must be 64-bit."""
    size = (1 << 31) + 5
    # param, anchor, acc, plus the autotuner's restore_value clones of param and acc.
    need = size * (2 + 2 + 4) + size * (2 + 4) + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough free GPU memory for a 2**31-element buffer")
    param = torch.full((size,), 1.5, dtype=torch.float16, device="cuda")
    anchor = torch.full((size,), -2.0, dtype=torch.float16, device="cuda")
    acc = torch.full((size,), 0.25, device="cuda")
    T.task_end_(param, anchor, acc)
    tail = slice(size - 70_000, size)
    assert (acc[tail] == 1.75).all() and (param[tail] == -2.0).all()
    assert acc[0] == 1.75 and param[0] == -2.0
    del param, anchor, acc
    torch.cuda.empty_cache()
