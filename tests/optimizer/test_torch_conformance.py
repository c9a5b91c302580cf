"""ReptileOptimizer's inner step against torch.optim, on PyTorch's own optimizer test inputs.

``torch.testing._internal.common_optimizers.optim_db`` holds the keyword sets torch
tests SGD and Adam with (``optim_inputs_func``) and the inputs that must raise
(``optim_error_inputs_func``).  Outside ``task()``, ``step()`` is a plain inner
optimizer step, so on the CPU the ``reference`` and ``cpp`` backends must give
torch's for-loop implementation bit for bit, in float32 and float64, whatever the
model shape: parameters that skip steps (``set_to_none=True``), channels-last conv
weights, gradients allocated outside the flat buffer.  With ``fused=True`` the inner
Adam must give ``torch.optim.Adam(fused=True)`` bit for bit instead, in every dtype
(torch's fused CPU kernel computes 16-bit tensors in float32, as the contract does).
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from reptile_fused import ReptileOptimizer, available_backends

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

EXACT_BACKENDS = [b for b in ("reference", "cpp") if b in available_backends("cpu")]
DTYPES = (torch.float32, torch.float64)
INNER = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam"}
STEPS = 5


def optim_inputs(cls):
    (info,) = [i for i in common_optimizers.optim_db if i.optim_cls is cls]
    return info.optim_inputs_func(device="cpu", dtype=torch.float32)


CASES = [(cls, oi) for cls in INNER for oi in optim_inputs(cls)]
# (case, implementation, dtype): torch's for-loop SGD and Adam in float32/float64, and
# torch's fused Adam (ReptileOptimizer(fused=True)) in every dtype it supports.
IMPL_CASES = [(case, "forloop", dtype) for case in CASES for dtype in DTYPES] + [
    (case, "fused", dtype)
    for case in CASES
    if case[0] is torch.optim.Adam
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
]


def case_id(case):
    cls, oi = case
    return f"{cls.__name__}-{oi.desc.replace(' ', '_')}"


def impl_case_id(impl_case):
    case, impl, dtype = impl_case
    return f"{case_id(case)}-{impl}-{str(dtype).removeprefix('torch.')}"


def model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv_channels_last":
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        return m.to(dtype).to(memory_format=torch.channels_last)
    # Odd sizes, so the flat buffer's alignment padding and the kernels' tails are exercised.
    return nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def inputs(kind: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    shape = (4, 3, 8, 8) if kind == "conv_channels_last" else (4, 7)
    return [(torch.randn(shape, generator=gen, dtype=dtype), torch.randn(4, 3, generator=gen, dtype=dtype)) for _ in range(STEPS)]


def train(m: nn.Module, opt, kind: str, data, *, set_to_none: bool) -> None:
    for step, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=set_to_none)
        out = m(x)
        if kind == "skip_params" and step % 2 == 1:
            # The middle layer gets no gradient on odd steps: with set_to_none it is skipped.
            out = m[4](m[3](m[2](m[1](m[0](x))).detach()))
        loss = ((out - y) ** 2).mean()
        loss.backward()
        if kind == "foreign_grads":
            # Gradients that live outside the flat buffer, as after model.zero_grad() or p.grad = ...
            for p in m.parameters():
                p.grad = p.grad.clone()
        opt.step()


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "skip_params", "conv_channels_last", "foreign_grads"])
@pytest.mark.parametrize("impl_case", IMPL_CASES, ids=impl_case_id)
def test_inner_step_is_torch_bit_for_bit(impl_case, kind, backend):
    (cls, oi), impl, dtype = impl_case
    kwargs = dict(oi.kwargs)
    if cls is torch.optim.Adam:
        kwargs.setdefault("betas", (0.9, 0.999))  # torch's default; ReptileOptimizer's is the authors' (0, 0.999)
    ours_model, torch_model = model(kind, dtype), model(kind, dtype)
    fmt = torch.channels_last if kind == "conv_channels_last" else None
    flags = dict(fused=True) if impl == "fused" else dict(foreach=False)
    ours = ReptileOptimizer(ours_model.parameters(), inner_optimizer=INNER[cls], backend=backend, memory_format=fmt,
                            **flags, **kwargs)  # fmt: skip
    theirs = cls(torch_model.parameters(), **flags, **kwargs)
    data = inputs(kind, dtype)
    set_to_none = kind == "skip_params"
    train(ours_model, ours, kind, data, set_to_none=set_to_none)
    train(torch_model, theirs, kind, data, set_to_none=set_to_none)
    for (name, a), b in zip(ours_model.named_parameters(), torch_model.parameters()):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item():.3g}"


def error_inputs(cls):
    (info,) = [i for i in common_optimizers.optim_db if i.optim_cls is cls]
    return info.optim_error_inputs_func(device="cpu", dtype=torch.float32)


ERROR_CASES = [(cls, e) for cls in INNER for e in error_inputs(cls)]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: f"{c[0].__name__}-{c[1].optimizer_error_input.desc.replace(' ', '_')}")
def test_error_inputs_raise_what_torch_raises(case):
    cls, e = case
    oi = e.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.rand(3, requires_grad=True)]
    kwargs = dict(oi.kwargs)
    if e.error_type is UserWarning:
        # torch warns about a parameter listed twice in one group, then steps it twice;
        # ReptileOptimizer packs each parameter once, so it refuses instead of differing.
        assert "duplicate" in oi.desc
        with pytest.raises(ValueError, match="listed twice in one param group"):
            ReptileOptimizer(params, inner_optimizer=INNER[cls], **kwargs)
        return
    if issubclass(e.error_type, Warning):
        # A warning that torch gives and then goes on (torch 2.15: a bare set of params,
        # whose order changes between runs): the same warning, then the same parameters.
        with pytest.warns(e.error_type, match=e.error_regex):
            theirs = cls(params, **kwargs)
        with pytest.warns(e.error_type, match=e.error_regex):
            ours = ReptileOptimizer(params, inner_optimizer=INNER[cls], **kwargs)
        ours_params, theirs_params = ([p for g in o.param_groups for p in g["params"]] for o in (ours, theirs))
        assert len(ours_params) == len(theirs_params) and all(map(operator.is_, ours_params, theirs_params))
        return
    with pytest.raises(e.error_type):
        cls(params, **kwargs)  # the yardstick itself raises
    with pytest.raises(e.error_type):
        ReptileOptimizer(params, inner_optimizer=INNER[cls], **kwargs)


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False, fused=False), dict(capturable=True),
                                   dict(differentiable=False)])  # fmt: skip
def test_implementation_flags_are_accepted_and_select_nothing(flags):
    results = []
    for kw in ({}, flags):
        m = model("mlp", torch.float32)
        opt = ReptileOptimizer(m.parameters(), inner_optimizer="adam", lr=0.01, **kw)
        train(m, opt, "mlp", inputs("mlp", torch.float32), set_to_none=False)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(*results)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_adam_default_is_the_for_loop_arithmetic_and_fused_true_torchs_fused_one(backend):
    """torch.optim.Adam on the CPU runs its for-loop implementation unless fused=True is
    asked for; ReptileOptimizer follows: the default (fused=None) and fused=False equal
    torch's for-loop Adam, fused=True its fused Adam, and the two differ (the square root
    and each tensor's tail round differently)."""
    results = {}
    for name, ours_flags, torch_flags in (
        ("default", {}, {}), ("for-loop", dict(fused=False), dict(foreach=False)), ("fused", dict(fused=True), dict(fused=True)),
    ):  # fmt: skip
        ours_model, torch_model = model("mlp", torch.float32), model("mlp", torch.float32)
        ours = ReptileOptimizer(ours_model.parameters(), inner_optimizer="adam", lr=0.01, betas=(0.9, 0.999),
                                backend=backend, **ours_flags)  # fmt: skip
        theirs = torch.optim.Adam(torch_model.parameters(), lr=0.01, **torch_flags)
        data = inputs("mlp", torch.float32)
        train(ours_model, ours, "mlp", data, set_to_none=False)
        train(torch_model, theirs, "mlp", data, set_to_none=False)
        results[name] = torch.cat([p.detach().flatten() for p in ours_model.parameters()])
        assert torch.equal(results[name], torch.cat([p.detach().flatten() for p in torch_model.parameters()])), name
    assert torch.equal(results["default"], results["for-loop"])
    assert not torch.equal(results["for-loop"], results["fused"])


def test_fused_and_foreach_together_are_refused_as_torch_refuses_them():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        torch.optim.Adam(p, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        ReptileOptimizer(p, inner_optimizer="adam", fused=True, foreach=True)


def test_differentiable_true_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="differentiable=True is not supported: the inner steps run in fused kernels"):
        ReptileOptimizer([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_named_parameters_as_in_torch(backend):
    ours_model, torch_model = model("mlp", torch.float32), model("mlp", torch.float32)
    named = list(ours_model.named_parameters())
    ours = ReptileOptimizer(
        [{"params": named[:2], "lr": 0.05}, {"params": named[2:]}], inner_optimizer="adam", lr=0.01, betas=(0.9, 0.999),
        backend=backend,
    )  # fmt: skip
    tn = list(torch_model.named_parameters())
    theirs = torch.optim.Adam([{"params": tn[:2], "lr": 0.05}, {"params": tn[2:]}], lr=0.01, foreach=False)
    data = inputs("mlp", torch.float32)
    train(ours_model, ours, "mlp", data, set_to_none=False)
    train(torch_model, theirs, "mlp", data, set_to_none=False)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.equal(a, b)
    names = [g["param_names"] for g in ours.state_dict()["param_groups"]]
    assert names == [g["param_names"] for g in theirs.state_dict()["param_groups"]] == [
        [n for n, _ in named[:2]], [n for n, _ in named[2:]]
    ]
    ReptileOptimizer(ours_model.named_parameters()).load_state_dict(
        ReptileOptimizer(model("mlp", torch.float32).named_parameters()).state_dict()
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
        (dict(betas=(torch.tensor(0.9), 0.99)), "betas must be either both floats or both Tensors"),
        (dict(lr=torch.tensor(0.01), foreach=True), "lr as a Tensor is not supported for capturable=False and foreach=True"),
    ],
)
def test_adam_tensor_scalars_refused_where_torch_refuses_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch.optim.Adam([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=message):
        ReptileOptimizer([torch.zeros(2, requires_grad=True)], inner_optimizer="adam", **kwargs)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("tensor_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_tensor_lr_and_betas(backend, dtype, tensor_dtype):
    """Adam accepts a Tensor lr and Tensor betas, as torch does.  Their values are read (lr
    by the kernel where it lives) and every coefficient is computed in float64 as for
    Python floats.  That is torch's fused Adam's arithmetic (bit for bit with fused=True);
    torch's for-loop Adam computes lr / (1 - beta1**t) and 1 - beta in the tensors' dtype
    instead, so with fused=False the trajectory is torch's for-loop Adam given the same
    values as floats (documented in the README)."""
    lr, betas = torch.tensor(0.01, dtype=tensor_dtype), (torch.tensor(0.9, dtype=tensor_dtype), torch.tensor(0.99, dtype=tensor_dtype))

    def tensors():
        return dict(lr=lr.clone(), betas=tuple(b.clone() for b in betas))

    floats = dict(lr=float(lr), betas=tuple(float(b) for b in betas))
    for flags, torch_kwargs in ((dict(fused=True), tensors), (dict(fused=False), lambda: floats)):
        ours_model, torch_model = model("mlp", dtype), model("mlp", dtype)
        ours = ReptileOptimizer(ours_model.parameters(), inner_optimizer="adam", backend=backend, **flags, **tensors())
        theirs = torch.optim.Adam(torch_model.parameters(), **(flags if flags["fused"] else dict(foreach=False)),
                                  **torch_kwargs())  # fmt: skip
        data = inputs("mlp", dtype)
        train(ours_model, ours, "mlp", data, set_to_none=False)
        train(torch_model, theirs, "mlp", data, set_to_none=False)
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            assert torch.equal(a, b), flags


def test_hyperparameters_of_the_other_inner_optimizer_are_refused():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="betas is not a hyperparameter of inner_optimizer='sgd'"):
        ReptileOptimizer(p, inner_optimizer="sgd", betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="momentum is not a hyperparameter of inner_optimizer='adam'"):
        ReptileOptimizer(p, inner_optimizer="adam", momentum=0.9)
    opt = ReptileOptimizer(p, inner_optimizer="sgd")
    assert set(opt.defaults) == {"lr", "meta_lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"}
    opt = ReptileOptimizer(p, inner_optimizer="adam")
    assert set(opt.defaults) == {"lr", "meta_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}


CUDA_BACKENDS = ["cpp", "triton"]
# On CUDA the kernels follow torch's operation order but nvcc and Triton choose their own
# fused multiply-adds and torch's CUDA sqrt is correctly rounded: a few ulp, as docs/numerics.md says.
CUDA_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inner_step_matches_torch_on_cuda(case, dtype, backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} cannot run on CUDA here")
    cls, oi = case
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in oi.kwargs.items()}
    if cls is torch.optim.Adam:
        kwargs.setdefault("betas", (0.9, 0.999))
    ours_model, torch_model = model("mlp", dtype).cuda(), model("mlp", dtype).cuda()
    ours = ReptileOptimizer(ours_model.parameters(), inner_optimizer=INNER[cls], backend=backend, **kwargs)
    theirs = cls(torch_model.parameters(), foreach=False, **kwargs)
    data = [(x.cuda(), y.cuda()) for x, y in inputs("mlp", dtype)]
    train(ours_model, ours, "mlp", data, set_to_none=False)
    train(torch_model, theirs, "mlp", data, set_to_none=False)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, **CUDA_TOL[dtype])


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="Triton's interpreter is not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inner_step_on_the_triton_interpreter_matches_torch(case, dtype):
    """The Triton kernels (in the interpreter here) follow the same arithmetic; numpy's
    own fused multiply-adds and sqrt may differ from torch's in the last bits."""
    cls, oi = case
    kwargs = dict(oi.kwargs)
    if cls is torch.optim.Adam:
        kwargs.setdefault("betas", (0.9, 0.999))
    ours_model, torch_model = model("mlp", dtype), model("mlp", dtype)
    ours = ReptileOptimizer(ours_model.parameters(), inner_optimizer=INNER[cls], backend="triton", **kwargs)
    theirs = cls(torch_model.parameters(), foreach=False, **kwargs)
    data = inputs("mlp", dtype)
    train(ours_model, ours, "mlp", data, set_to_none=False)
    train(torch_model, theirs, "mlp", data, set_to_none=False)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, **CUDA_TOL[dtype])
