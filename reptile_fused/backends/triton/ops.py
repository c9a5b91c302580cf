"""The Triton kernels as ``torch.library`` ops in the ``reptile_fused_triton`` namespace.

``torch.library.triton_op`` lets ``torch.compile`` see through each op to the Triton
kernel inside (instead of treating it as an opaque call), so it can be captured in
a graph without a break.  Importing this module imports Triton.

Each op's schema comes from :mod:`reptile_fused.backends.op_table`, the same one the
C++ extension registers; its launcher in :mod:`.kernels` takes the schema's arguments
in the schema's order.  Arguments are expected to be validated already: call these
through :mod:`reptile_fused.backends.triton`, which does.
"""

from __future__ import annotations

import inspect

import torch
from torch.library import triton_op

from ..op_table import OPS
from . import kernels

NAMESPACE = "reptile_fused_triton"

LAUNCHERS = {
    "sgd_step_": kernels.sgd,
    "adam_step_": kernels.adam,
    "task_end_": kernels.task_end,
    "meta_update_": kernels.meta_update,
    "batched_meta_update_": kernels.batched_meta_update,
}


_ANNOTATIONS = {
    "Tensor": torch.Tensor, "Tensor?": torch.Tensor | None, "float": float, "bool": bool, "int": int,
    "int[]?": list[int] | None,
}  # fmt: skip


def _launch(op, launcher):
    def impl(*args) -> None:
        launcher(*args)

    # torch 2.11 ignores triton_op's schema= and infers the schema from the function's
    # signature: give it the schema's arguments, annotated (later releases read schema=).
    impl.__signature__ = inspect.Signature(
        [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[a.type])
         for a in op.args],
        return_annotation=None,
    )  # fmt: skip
    return impl


for _op in OPS:
    triton_op(f"{NAMESPACE}::{_op.name}", _launch(_op, LAUNCHERS[_op.name]), mutates_args=_op.mutated,
              schema=f"({_op.signature}) -> ()")  # fmt: skip
del _op
