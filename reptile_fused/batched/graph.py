"""One meta-iteration recorded as a CUDA graph and replayed with new inputs.

:class:`~reptile_fused.BatchedReptile` records ``meta_iteration`` once and replays it:
the inputs are copied into the graph's static buffers, and the scalars that change
between iterations (``lr``, ``meta_lr``, Adam's step) live in device tensors that the
kernels read, so a replay sees their current values without re-capture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CAPTURABLE_BACKENDS", "CapturedIteration", "capture_unavailable_reason", "graph_key", "describe_key"]

# The backends whose kernels read the scalars that change between replays (lr,
# meta_lr, Adam's step count) from device tensors.
CAPTURABLE_BACKENDS = ("cpp", "triton")

# What a captured graph is fixed to: (inner_steps, xs shape/dtype/device, ys shape/dtype/device).
GraphKey = tuple


def capture_unavailable_reason(devices, backends, reads: str) -> str | None:
    """Why work on ``devices`` (device types) through ``backends`` (names) cannot be
    recorded as a CUDA graph, ``None`` when it can; ``reads`` names the scalars a
    host-reading backend would freeze into the graph."""
    devices = set(devices)
    if devices != {"cuda"}:
        return f"CUDA graphs need CUDA tensors, the model's parameters are on {sorted(devices)}"
    slow = sorted(set(backends) - set(CAPTURABLE_BACKENDS))
    if slow:
        return (f"backend {slow[0]!r} reads {reads} on the host, which a CUDA graph cannot hold; "
                "capture needs the 'cpp' or 'triton' backend on CUDA")
    return None


def graph_key(xs: Tensor, ys: Tensor, inner_steps: int | None) -> GraphKey:
    return (inner_steps, tuple(xs.shape), xs.dtype, xs.device, tuple(ys.shape), ys.dtype, ys.device)


def describe_key(key: GraphKey) -> str:
    steps, xshape, xdtype, xdev, yshape, ydtype, ydev = key
    return f"xs {list(xshape)} {xdtype} on {xdev}, ys {list(yshape)} {ydtype} on {ydev}, inner_steps={steps}"


class CapturedIteration:
    """``run(xs, ys, inner_steps)`` recorded once as a CUDA graph.

    Construction runs this call's real iteration eagerly on a side stream (which also
    initialises autograd, the allocator and the lazily created state buffers outside
    the capture), then records the graph; capturing records without running, so the
    warm-up has done this call's work.
    """

    def __init__(
        self,
        run: Callable[[Tensor, Tensor, int | None], None],
        xs: Tensor,
        ys: Tensor,
        inner_steps: int | None,
        device: torch.device | None = None,
        prepare: Callable[[Tensor, Tensor, int | None], None] | None = None,
    ):
        for t in (xs, ys):
            if t.device.type != "cuda":
                raise ValueError(f"capture: xs and ys must be CUDA tensors, got one on {t.device}")
        self.key = graph_key(xs, ys, inner_steps)
        # The model's GPU, current for the warm-up, the capture and every replay: streams,
        # the graph's memory pool and launches that use the current device (Triton's) all
        # follow it, so a model on cuda:1 works while cuda:0 is current.
        self.device = torch.device(device if device is not None else xs.device)
        with torch.cuda.device(self.device):
            static_x, static_y = xs.clone(), ys.clone()
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                run(static_x, static_y, inner_steps)
                # Whatever the recorded call will launch that the warm-up did not (kernel
                # variants compile at their first launch, which a capture forbids).
                if prepare is not None:
                    prepare(static_x, static_y, inner_steps)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run(static_x, static_y, inner_steps)
        self.graph = graph
        self.static = (static_x, static_y)

    def replay(self, xs: Tensor, ys: Tensor) -> None:
        static_x, static_y = self.static
        with torch.cuda.device(self.device):
            static_x.copy_(xs)
            static_y.copy_(ys)
            self.graph.replay()
