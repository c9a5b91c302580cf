"""Memory formats of flat buffers: each parameter keeps (or gets) its element order in
the buffer, and no update, checkpoint or distributed check depends on that order."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile_fused import ReptileOptimizer, available_backends
from reptile_fused.batched import BatchedReptile
from reptile_fused.flat import FlatBuffer, packed_strides
from reptile_fused.models import OmniglotNet

torch.set_num_threads(1)

CPU_BACKENDS = available_backends("cpu")
CL = torch.channels_last


def small_conv(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, stride=2), nn.Flatten(), nn.Linear(5 * 3 * 3, 4)
    ).to(dtype)


def in_buffer(t, buf):
    start = buf.data_ptr()
    end = start + buf.numel() * buf.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


def is_cl(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_channels_last_model_keeps_its_layout(dtype):
    model = small_conv(dtype=dtype).to(memory_format=CL)
    before = [p.detach().clone() for p in model.parameters()]
    buf = FlatBuffer(list(model.parameters()))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert p.stride() == b.stride() and p.grad.stride() == b.stride()
        assert in_buffer(p, buf.data) and in_buffer(p.grad, buf.grad)
    assert is_cl(model[0].weight) and is_cl(model[2].weight)


def test_memory_format_converts_only_the_matching_rank():
    model = small_conv()
    values = [p.detach().clone() for p in model.parameters()]
    ReptileOptimizer(model.parameters(), memory_format=CL)
    for p, v in zip(model.parameters(), values):
        assert torch.equal(p, v)
        if p.dim() == 4:
            assert is_cl(p) and is_cl(p.grad)
        else:
            assert p.is_contiguous() and p.grad.is_contiguous()

    cl_model = small_conv().to(memory_format=CL)
    ReptileOptimizer(cl_model.parameters(), memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in cl_model.parameters())


def test_non_dense_parameters_are_packed_densely():
    base = torch.randn(6, 8)
    strided = nn.Parameter(base[:, ::2])  # a view with gaps
    transposed = nn.Parameter(torch.randn(5, 3).t())  # dense, column-major
    assert packed_strides(strided) == (4, 1)
    assert packed_strides(transposed) == (1, 3)
    values = [strided.detach().clone(), transposed.detach().clone()]
    FlatBuffer([strided, transposed])
    assert torch.equal(strided, values[0]) and torch.equal(transposed, values[1])
    assert transposed.stride() == (1, 3)


@pytest.mark.parametrize("bad", ["channels_last", torch.preserve_format, 4])
def test_a_bad_memory_format_changes_nothing(bad):
    model = small_conv()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match="memory_format"):
        ReptileOptimizer(model.parameters(), memory_format=bad)
    with pytest.raises(ValueError, match="memory_format"):
        BatchedReptile(model, 2, memory_format=bad)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.grad is None for p in model.parameters())


def test_autograd_writes_channels_last_gradients_into_the_buffer():
    model = small_conv()
    opt = ReptileOptimizer(model.parameters(), memory_format=CL)
    grads = [p.grad for p in model.parameters()]
    F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 3])).backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    (f,) = opt.flat_buffers
    assert f.pending_grads() == (None, [])  # the fast path: nothing to copy in


def reptile_run(model, backend, memory_format, inner_optimizer, rounds=2, tasks=2, steps=3):
    """Reptile with gradients that do not depend on the layout (a fixed function of the
    current weights), so any difference between layouts would be the optimizer's."""
    kwargs = dict(momentum=0.9, nesterov=True, weight_decay=0.01) if inner_optimizer == "sgd" else dict(betas=(0.5, 0.9))
    opt = ReptileOptimizer(
        model.parameters(), inner_optimizer, lr=0.05, meta_lr=0.6, backend=backend,
        memory_format=memory_format, **kwargs,
    )
    for r in range(rounds):
        for t in range(tasks):
            with opt.task():
                for s in range(steps):
                    for i, p in enumerate(model.parameters()):
                        p.grad.copy_(torch.sin(p.detach() * (1 + i + t) + r + s))
                    opt.step()
        opt.meta_step()
    return opt


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_updates_are_bitwise_the_same_in_every_layout(backend, inner_optimizer):
    row_major = small_conv()
    channels_last = copy.deepcopy(row_major)
    a = reptile_run(row_major, backend, None, inner_optimizer)
    b = reptile_run(channels_last, backend, CL, inner_optimizer)
    assert is_cl(channels_last[0].weight)
    for p, q in zip(row_major.parameters(), channels_last.parameters()):
        assert torch.equal(p, q)
    for (k, sa), (_, sb) in zip(a.state_dict()["state"].items(), b.state_dict()["state"].items()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (k, key)


@pytest.mark.gpu
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_updates_are_bitwise_the_same_in_every_layout_on_cuda(inner_optimizer):
    for backend in available_backends("cuda"):
        row_major = small_conv().cuda()
        channels_last = copy.deepcopy(row_major)
        reptile_run(row_major, backend, None, inner_optimizer)
        reptile_run(channels_last, backend, CL, inner_optimizer)
        assert is_cl(channels_last[0].weight)
        for p, q in zip(row_major.parameters(), channels_last.parameters()):
            assert torch.equal(p, q), backend


def test_a_checkpoint_moves_between_layouts():
    source = small_conv()
    opt = reptile_run(source, "reference", CL, "adam", rounds=1)
    with opt.task():  # mid-meta-batch: the anchor and the task sum are in the checkpoint too
        opt.step()
    state = copy.deepcopy(opt.state_dict())

    target = small_conv(seed=1)
    target.load_state_dict(source.state_dict())
    restored = ReptileOptimizer(
        target.parameters(), "adam", lr=0.05, meta_lr=0.6, betas=(0.5, 0.9), backend="reference"
    )
    restored.load_state_dict(state)
    assert target[0].weight.is_contiguous()
    for (k, sa), (_, sb) in zip(state["state"].items(), restored.state_dict()["state"].items()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (k, key)
    restored.meta_step()
    opt.meta_step()
    for p, q in zip(source.parameters(), target.parameters()):
        assert torch.equal(p, q)


def test_the_distributed_layout_check_sees_memory_formats():
    a = ReptileOptimizer(small_conv().parameters(), process_group=False)
    b = ReptileOptimizer(small_conv().parameters(), process_group=False, memory_format=CL)
    c = ReptileOptimizer(small_conv().parameters(), process_group=False)
    from reptile_fused.distributed import layout_of

    assert layout_of(a._flats) != layout_of(b._flats)
    assert layout_of(a._flats) == layout_of(c._flats)


def assert_layouts_train_alike(run):
    """``run(model, memory_format, xs, ys)`` on the Omniglot-style net, row-major and
    channels-last from the same weights and data: the convolutions sum in another order,
    nothing else changes."""
    torch.manual_seed(0)
    xs, ys = torch.randn(2, 3, 10, 1, 28, 28), torch.randint(0, 5, (2, 3, 10))
    results = []
    for fmt in (None, CL):
        torch.manual_seed(0)
        model = OmniglotNet(5)
        run(model, fmt, xs, ys)
        assert is_cl(model.features[3].weight) == (fmt is CL)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_channels_last_training_matches_row_major():
    def run(model, fmt, xs, ys):
        opt = ReptileOptimizer(model.parameters(), lr=0.05, meta_lr=0.5, memory_format=fmt)
        for task in range(2):
            with opt.task():
                for step in range(3):
                    opt.zero_grad()
                    F.cross_entropy(model(xs[task, step]), ys[task, step]).backward()
                    opt.step()
        opt.meta_step()

    assert_layouts_train_alike(run)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batched_channels_last_matches_batched_row_major(backend):
    def run(model, fmt, xs, ys):
        br = BatchedReptile(model, 3, lr=0.05, meta_lr=0.5, backend=backend, memory_format=fmt)
        assert br._groups[0].leaves[4].stride()[1:] == model.features[3].weight.stride()
        for step in range(2):
            br.inner_step(xs[step], ys[step])
        br.meta_step()

    assert_layouts_train_alike(run)


@pytest.mark.parametrize("batched", [False, True])
def test_reptile_train_passes_the_memory_format_on(batched):
    from reptile_fused import reptile_train

    def tasks():
        g = torch.Generator().manual_seed(0)
        while True:
            yield (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g),
                   torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g))

    model = small_conv()
    reptile_train(model, tasks(), inner_steps=2, num_iterations=2, device="cpu", meta_batch_size=2,
                  batched=batched, log_interval=0, memory_format=CL)
    assert is_cl(model[0].weight) and is_cl(model[2].weight)


def test_changing_the_layout_after_construction_is_caught():
    model = small_conv()
    opt = ReptileOptimizer(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    model.to(memory_format=CL)  # new storage for the conv weights, outside the flat buffer
    F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 3])).backward()
    with pytest.raises(RuntimeError, match="memory format"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
