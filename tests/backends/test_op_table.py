"""The op table is the one description of the five ops: every backend's registered schema matches it."""

from __future__ import annotations

import inspect

import pytest
import torch

from reptile_fused import reference
from reptile_fused.backends import cpp, op_table, unavailable_reason
from reptile_fused.backends.op_table import OP_NAMES, OPS, schema


def registered_schema(namespace: str, name: str) -> str:
    return str(getattr(getattr(torch.ops, namespace), name).default._schema)


@pytest.mark.skipif(cpp.unavailable_reason(torch.device("cpu")) is not None, reason="C++ extension not built")
@pytest.mark.parametrize("op", OPS, ids=OP_NAMES)
def test_cpp_schema_is_the_table(op):
    assert registered_schema("reptile_fused", op.name) == schema(op, "reptile_fused")


@pytest.mark.parametrize("op", OPS, ids=OP_NAMES)
def test_triton_schema_is_the_table(op):
    pytest.importorskip("triton")
    from reptile_fused.backends.triton import ops as triton_ops

    assert registered_schema(triton_ops.NAMESPACE, op.name) == schema(op, triton_ops.NAMESPACE)


@pytest.mark.parametrize("op", OPS, ids=OP_NAMES)
def test_every_backend_exposes_the_reference_signature(op):
    reference_signature = inspect.signature(getattr(reference, op.name))
    for name in ("cpp", "triton"):
        module = pytest.importorskip(f"reptile_fused.backends.{name}")
        assert inspect.signature(getattr(module, op.name)) == reference_signature, name


@pytest.mark.parametrize("op", OPS, ids=OP_NAMES)
def test_table_describes_the_reference_arguments(op):
    """Every Python argument appears in the schema, tensor-able scalars as a float + Tensor? pair."""
    python = list(inspect.signature(getattr(reference, op.name)).parameters)
    schema_names = [a.name for a in op.args]
    pairs = {f"{s}_tensor" for s in op.tensor_scalars}
    assert [n for n in schema_names if n not in pairs] == python
    for scalar in op.tensor_scalars:
        assert schema_names[schema_names.index(scalar) + 1] == f"{scalar}_tensor"
    assert set(op.only_if) <= {a.name for a in op.args if a.type == "Tensor?"}
    assert op.mutated and all(a.type.startswith("Tensor") for a in op.args if a.mutated)
    assert set(inspect.signature(op.check).parameters) <= set(python)


def test_table_parses_mutated_arguments():
    table = {op.name: op.mutated for op in OPS}
    assert table == {
        "sgd_step_": ("param", "momentum_buffer", "update"),
        "adam_step_": ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "update"),
        "task_end_": ("param", "acc"),
        "meta_update_": ("param", "acc"),
        "batched_meta_update_": ("theta", "tasks"),
    }


def test_bound_op_checks_before_the_kernel():
    calls = []
    sgd = op_table.bind(OPS[0], lambda *args: calls.append(args))
    with pytest.raises(ValueError, match="momentum != 0 needs a momentum_buffer"):
        sgd(torch.zeros(3), torch.zeros(3), None, 0.1, momentum=0.9)
    assert calls == []
    lr = torch.tensor(0.5)
    sgd(torch.zeros(3), torch.zeros(3), torch.zeros(3), lr, momentum=0.0)
    (args,) = calls
    # A CPU tensor scalar with CPU buffers goes to the kernel as a tensor; the unused buffer as None.
    assert args[2] is None and args[3] == 0.0 and args[4] is lr
    assert unavailable_reason("reference", "cpu") is None
