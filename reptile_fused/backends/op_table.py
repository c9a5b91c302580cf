"""The five flat-buffer ops, described once; every compiled backend binds its kernels from here.

An op is its dispatcher schema (the one the C++ extension registers in
``csrc/ops.cpp`` and the Triton backend registers with ``torch.library.triton_op``)
plus what the schema cannot say:

* its Python signature, which is :mod:`reptile_fused.reference`'s (the oracle): a
  scalar that may be a 0-dim tensor (``lr``, ``meta_lr``, ``n``, ``step``) is one
  argument there and two in the schema, ``float x`` + ``Tensor? x_tensor``, because a
  schema cannot say "a float or a tensor";
* its argument check, from :mod:`reptile_fused._validate`, run before any kernel
  touches memory so that every backend rejects the same input the same way;
* optional buffers the kernel must not read unless a flag asks for them
  (``momentum_buffer`` only with momentum, ``max_exp_avg_sq`` only with amsgrad).

:func:`bind` turns one entry into the Python function a backend exposes: bind the
caller's arguments to the reference signature, check them, split each tensor-able
scalar (:func:`~reptile_fused._validate.split_scalar`: a tensor on the buffers' device
is read by the kernel, so a CUDA graph replays with its current value; anything else
is read on the host), coerce the plain scalars to the schema's types, and call the
registered op.  Adding an op means one entry here, one reference function, and one
kernel per backend.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from .. import _validate, reference

__all__ = ["OpDef", "OPS", "OP_NAMES", "Arg", "bind", "schema"]


@dataclass(frozen=True)
class Arg:
    """One argument of a schema."""

    name: str
    type: str  # "Tensor", "Tensor?", "float", "bool", "int[]?"
    mutated: bool = False


@dataclass(frozen=True)
class OpDef:
    name: str
    # The schema's argument list, as written in TORCH_LIBRARY (alias annotations mark the mutated buffers).
    signature: str
    check: Callable[..., None]
    # Optional buffer -> predicate over the bound Python arguments: pass None unless it holds.
    only_if: dict[str, Callable[[dict], bool]] = field(default_factory=dict)

    @functools.cached_property
    def args(self) -> tuple[Arg, ...]:
        out = []
        for part in self.signature.split(","):
            type_, name = part.strip().rsplit(" ", 1)
            mutated = "!" in type_
            type_ = re.sub(r"\([a-z]!\)", "", type_)
            out.append(Arg(name, type_, mutated))
        return tuple(out)

    @property
    def mutated(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.mutated)

    @property
    def tensor_scalars(self) -> tuple[str, ...]:
        """The scalars that may be 0-dim tensors: ``float x`` followed by ``Tensor? x_tensor``."""
        names = {a.name for a in self.args}
        return tuple(a.name for a in self.args if a.type == "float" and f"{a.name}_tensor" in names)

    def kernel_plan(self) -> tuple[tuple[str, str], ...]:
        """How :func:`_kernel_args` fills each schema position from the bound Python arguments,
        worked out once by :func:`bind` rather than on every call: ``(kind, name)`` with kind
        ``"scalar"`` (a tensor-able scalar; its ``Tensor? x_tensor`` half must come next and
        is filled with it), ``"only_if"``, ``"float"``, ``"bool"`` or ``"as_is"``."""
        scalars = set(self.tensor_scalars)
        plan = []
        args = self.args
        for i, arg in enumerate(args):
            if arg.name in scalars:
                if i + 1 == len(args) or args[i + 1].name != f"{arg.name}_tensor":
                    raise ValueError(f"{self.name}: Tensor? {arg.name}_tensor must follow float {arg.name}")
                plan.append(("scalar", arg.name))
            elif arg.name.endswith("_tensor") and arg.name[: -len("_tensor")] in scalars:
                continue  # filled with its scalar
            elif arg.name in self.only_if:
                plan.append(("only_if", arg.name))
            elif arg.type in _COERCE:
                plan.append((arg.type, arg.name))
            else:
                plan.append(("as_is", arg.name))
        return tuple(plan)

    @property
    def python_signature(self) -> inspect.Signature:
        return inspect.signature(getattr(reference, self.name))


OPS: tuple[OpDef, ...] = (
    OpDef(
        "sgd_step_",
        "Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, float lr, Tensor? lr_tensor, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
        "Tensor(c!)? update",
        _validate.check_sgd_step,
        only_if={"momentum_buffer": lambda a: a["momentum"] != 0},
    ),
    OpDef(
        "adam_step_",
        "Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!)? max_exp_avg_sq, "
        "float step, Tensor? step_tensor, float lr, Tensor? lr_tensor, "
        "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, Tensor(e!)? update, "
        "bool fused, int[]? spans",
        _validate.check_adam_step,
        only_if={"max_exp_avg_sq": lambda a: bool(a["amsgrad"])},
    ),
    OpDef("task_end_", "Tensor(a!) param, Tensor anchor, Tensor(b!) acc, Tensor? update", _validate.check_task_end),
    OpDef(
        "meta_update_",
        "Tensor(a!) param, Tensor anchor, Tensor(b!) acc, float meta_lr, Tensor? meta_lr_tensor, float n, Tensor? n_tensor",
        _validate.check_meta_update,
    ),
    OpDef(
        "batched_meta_update_",
        "Tensor(a!) theta, Tensor(b!) tasks, float meta_lr, Tensor? meta_lr_tensor, bool write_back, Tensor? updates",
        _validate.check_batched_meta_update,
    ),
)

OP_NAMES: tuple[str, ...] = tuple(op.name for op in OPS)


def schema(op: OpDef, namespace: str | None = None) -> str:
    """The full schema string, ``name(args) -> ()``, optionally qualified by ``namespace``."""
    name = op.name if namespace is None else f"{namespace}::{op.name}"
    return f"{name}({op.signature}) -> ()"


_COERCE = {"float": float, "bool": bool}


def _compiled_scalar(value, device: torch.device) -> tuple[float, torch.Tensor]:
    """A tensor-able scalar given as a number, inside a ``torch.compile`` trace: handed to the
    kernel as a float64 0-dim tensor on the buffers' device (the same value, so the same
    numbers as eager).  A number in a ``float`` schema argument would be specialised: the
    compiled step would guard on each value and recompile for every new learning rate or
    Adam step count; as a graph tensor it is read when the graph runs.  (Made as 1.0 * value,
    a multiplication AOTAutograd's pass that turns float inputs into tensors can rewrite,
    where a scalar_tensor(value) would be specialised there: one graph per value again.)"""
    return 0.0, torch.ones((), dtype=torch.float64, device=device) * value


def _kernel_args(op: OpDef, plan: tuple[tuple[str, str], ...], bound: dict, device: torch.device) -> list:
    """The bound Python arguments laid out as the schema's positional arguments (``plan``: ``op.kernel_plan()``)."""
    out: list = []
    compiling = torch.compiler.is_compiling()
    for kind, name in plan:
        value = bound[name]
        if kind == "scalar":
            if compiling and not isinstance(value, torch.Tensor):
                out.extend(_compiled_scalar(value, device))
            else:
                out.extend(_validate.split_scalar(value, name, device))
        elif kind == "only_if":
            out.append(value if op.only_if[name](bound) else None)
        elif kind == "as_is":
            out.append(value)
        else:
            out.append(_COERCE[kind](value))
    return out


def bind(op: OpDef, kernel: Callable[..., None], before_call: Callable[[torch.device, str], None] | None = None):
    """The Python function of ``op`` for one backend: reference signature, shared check, ``kernel(*schema_args)``.

    ``before_call(device, op_name)`` runs after the check and before the kernel (the
    Triton backend uses it to refuse devices it cannot run on).  The function is written
    out with the reference's parameters (no ``inspect.Signature.bind`` per call), so
    ``torch.compile(fullgraph=True)`` traces through it to the registered op."""
    reference_fn = getattr(reference, op.name)
    signature = op.python_signature
    names = list(signature.parameters)
    check_params = tuple(inspect.signature(op.check).parameters)
    first = op.args[0].name
    plan = op.kernel_plan()

    def run(values: dict) -> None:
        op.check(*(values[name] for name in check_params))
        device = values[first].device
        if before_call is not None:
            before_call(device, op.name)
        kernel(*_kernel_args(op, plan, values, device))

    source = f"def {op.name}({', '.join(names)}):\n    run({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n"
    namespace: dict = {"run": run}
    exec(source, namespace)  # noqa: S102 - the source is built from the reference signature only
    call = namespace[op.name]
    call.__defaults__ = inspect.unwrap(reference_fn).__defaults__
    call.__kwdefaults__ = inspect.unwrap(reference_fn).__kwdefaults__
    call.__signature__ = signature
    call.__doc__ = f"``reference.{op.name}`` in one fused pass (same signature, checks and numerics)."
    call.__module__ = __name__
    return torch.no_grad()(call)
