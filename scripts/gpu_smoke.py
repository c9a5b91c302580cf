"""The one-minute smoke stage of `make gpu-check`: every op on every dtype at one awkward
size against the reference, on both backends, and one CUDA-graph capture and replay per
backend (the issue-13 trigger: Triton, momentum, reset 'never', one inner step).

    python scripts/gpu_smoke.py OUT.json [--device cuda|cpu]

Each case is caught on its own, so one failure never hides the others; OUT.json lists
every case and its outcome.  Exit status 1 if any case failed.  With ``--device cpu``
(the dry run) the sizes are tiny, Triton runs in its interpreter and the capture is
replaced by an eager run (CUDA graphs need CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--device", default=None)
args = parser.parse_args()

import torch  # noqa: E402

device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from gpu_ready import gpu_cases as C  # noqa: E402
from reptile_fused import available_backends  # noqa: E402
from reptile_fused.batched import BatchedReptile  # noqa: E402

SIZE = 1_000_003 if device == "cuda" else 1027  # vector path, several programs, a tail
cases = []


def case(name, fn):
    start = time.perf_counter()
    try:
        fn()
        outcome, detail = "passed", ""
    except Exception as exc:  # noqa: BLE001 - recorded, the stage fails at the end
        outcome, detail = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    if device == "cuda":
        torch.cuda.synchronize()
    cases.append({"case": name, "outcome": outcome, "seconds": round(time.perf_counter() - start, 3), "detail": detail})
    print(f"{outcome:7s} {name} {detail[:200]}", flush=True)


def capture(backend):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(device)  # noqa: E731
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    kw = dict(loss_fn=F.mse_loss, lr=0.05, meta_lr=0.5, backend=backend, momentum=0.9, reset_inner_state="never")
    eager = BatchedReptile(a, 4, **kw)
    graph = BatchedReptile(b, 4, capture=device == "cuda", **kw)
    xs, ys = torch.randn(1, 4, 8, 3, device=device), torch.randn(1, 4, 8, 2, device=device)
    for t in range(4):
        for br in (eager, graph):
            br.meta_iteration(xs * (1 + t / 10), ys)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


backends = [b for b in ("cpp", "triton") if b in available_backends(device)]
for missing in sorted({"cpp", "triton"} - set(backends)):
    cases.append({"case": f"{missing} backend", "outcome": "unavailable", "seconds": 0, "detail": ""})
    print(f"unavailable: backend {missing} on {device}")
for backend in backends:
    for dtype, dtype_id in zip(C.DTYPES, C.DTYPE_IDS):
        case(f"{backend} sgd_step_ {dtype_id}", lambda: C.run_sgd(backend, SIZE, dtype, device, "nesterov-wd", "tensor"))
        case(f"{backend} adam_step_ {dtype_id}", lambda: C.run_adam(backend, SIZE, dtype, device, "amsgrad-wd", 3, "tensor", "python"))
        case(f"{backend} task_end_+meta_update_ {dtype_id}", lambda: C.run_task_end_and_meta_update(backend, SIZE, dtype, device, "tensor"))
        case(f"{backend} batched_meta_update_ {dtype_id}", lambda: C.run_batched(backend, SIZE, dtype, device, rows=3))
    case(f"{backend} capture+replay" if device == "cuda" else f"{backend} eager (dry run)", lambda: capture(backend))

passed = sum(c["outcome"] == "passed" for c in cases)
failed = sum(c["outcome"] == "failed" for c in cases)
args.out.write_text(json.dumps({"device": device, "size": SIZE, "passed": passed, "failed": failed, "cases": cases}, indent=1))
print(f"smoke: {passed} passed, {failed} failed on {device} (size {SIZE})")
sys.exit(1 if failed else 0)
