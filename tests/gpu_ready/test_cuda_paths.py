"""CUDA paths no other test value-checks (issue 13, section 2).

* The cpp kernels' vector loop where one thread handles several 16-byte chunks: the
  grid is capped at 8 blocks of 256 threads per SM, so an aligned buffer longer than
  ``SMs * 8 * 256 * VEC`` elements makes every thread loop.  Checked against the
  reference on every op and dtype, with and without a scalar tail.
* Buffers longer than 2**31 elements (64-bit offsets), on both backends, and ``[n, P]``
  task buffers whose row offsets pass 2**31.  Each skips unless the GPU has the memory
  the test really needs, counted with Triton's autotuning copies (``restore_value``
  clones every buffer a kernel mutates while it benchmarks).
"""

from __future__ import annotations

import pytest
import torch

from reptile_fused import available_backends, get_backend

from .gpu_cases import DTYPE_IDS, DTYPES, run_adam, run_batched, run_sgd, run_task_end_and_meta_update

pytestmark = pytest.mark.gpu

THREADS = 256  # kThreads in kernels.cu
BLOCKS_PER_SM = 8  # the grid cap in kernels.cu's launch()
GiB = 1 << 30


def _cpp():
    if "cpp" not in available_backends("cuda"):
        from reptile_fused.backends import cpp

        pytest.fail(f"backend 'cpp' cannot run on CUDA: {cpp.unavailable_reason(torch.device('cuda'))}")
    return "cpp"


def _free_bytes() -> int:
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def _need(nbytes: int, what: str) -> None:
    free = _free_bytes()
    if free < nbytes:
        pytest.skip(f"{what} needs {nbytes / GiB:.1f} GiB of free GPU memory, {free / GiB:.1f} GiB are free")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tail", (0, 5))
def test_vector_loop_with_several_chunks_per_thread(dtype, tail):
    backend = _cpp()
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    threads = sms * BLOCKS_PER_SM * THREADS
    size = 3 * threads * vec + vec + tail  # every thread takes 3 or 4 vector chunks
    assert size // vec > 2 * threads
    run_sgd(backend, size, dtype, "cuda", "nesterov-wd", "tensor", seed=1)
    run_sgd(backend, size, dtype, "cuda", "momentum-first", "python", seed=2)
    run_adam(backend, size, dtype, "cuda", "amsgrad-wd", 3, "tensor", "python", seed=3)
    run_task_end_and_meta_update(backend, size, dtype, "cuda", "tensor", seed=4)
    # Rows stay 16-byte aligned only when P is a multiple of VEC (tail 0); tail 5 takes the scalar path.
    run_batched(backend, size, dtype, "cuda", rows=3, seed=5)


def _backends():
    return [b for b in ("cpp", "triton") if torch.cuda.is_available() and b in available_backends("cuda")]


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_flat_buffer_beyond_int32(backend):
    """task_end_, meta_update_ and sgd_step_ over 2**31 + 5 float16 elements."""
    if backend not in _backends():
        pytest.skip(f"backend {backend!r} is not available on CUDA")
    size = (1 << 31) + 5
    # param, anchor (float16), acc (float32); Triton's autotuner clones the mutated ones
    # (param and acc) while it benchmarks; 1 GiB for its cache-flush buffer and slack.
    need = size * (2 + 2 + 4) + (size * (2 + 4) if backend == "triton" else 0) + GiB
    _need(need, f"a 2**31-element {backend} test")
    B = get_backend(backend, "cuda")
    param = torch.full((size,), 1.5, dtype=torch.float16, device="cuda")
    anchor = torch.full((size,), -2.0, dtype=torch.float16, device="cuda")
    acc = torch.full((size,), 0.25, device="cuda")
    spots = (slice(0, 70_000), slice((1 << 31) - 70_000, (1 << 31) + 5), slice(size - 70_000, size))
    try:
        B.task_end_(param, anchor, acc)
        for s in spots:
            assert (acc[s] == 1.75).all() and (param[s] == -2.0).all(), s
        B.meta_update_(param, anchor, acc, 0.5, 2)  # -2 + 0.5 * (1.75 / 2 + 2) = -0.5625, exact
        for s in spots:
            assert (param[s] == -0.5625).all() and (acc[s] == 0).all(), s
        del acc
        B.sgd_step_(param, anchor, None, 0.25)  # -0.5625 - 0.25 * -2 = -0.0625
        for s in spots:
            assert (param[s] == -0.0625).all(), s
    finally:
        del param, anchor
        torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ("cpp", "triton"))
@pytest.mark.parametrize("pad", (0, 3))
def test_task_rows_beyond_int32(backend, pad):
    """batched_meta_update_ over [2, 2**30 + 8 + pad] float16 rows: row 1 starts below and
    ends above 2**31 elements into the buffer (aligned vector path for pad 0, scalar for 3)."""
    if backend not in _backends():
        pytest.skip(f"backend {backend!r} is not available on CUDA")
    P = (1 << 30) + 8 + pad
    need = 3 * P * 2 + (3 * P * 2 if backend == "triton" else 0) + GiB
    _need(need, f"a 2**31-element [n, P] {backend} test")
    B = get_backend(backend, "cuda")
    tasks = torch.empty((2, P), dtype=torch.float16, device="cuda")
    tasks[0].fill_(1.0)
    tasks[1].fill_(3.0)
    theta = torch.zeros(P, dtype=torch.float16, device="cuda")
    try:
        B.batched_meta_update_(theta, tasks, 1.0, write_back=True)  # mean 2.0, theta 0 -> 2.0
        for s in (slice(0, 70_000), slice(P - 70_000, P)):
            assert (theta[s] == 2.0).all(), s
            assert (tasks[0, s] == 2.0).all() and (tasks[1, s] == 2.0).all(), s
    finally:
        del tasks, theta
        torch.cuda.empty_cache()
