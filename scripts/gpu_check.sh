#!/usr/bin/env bash
# GPU validation (`make gpu-check`, issue 13): on a machine with a CUDA GPU and torch
# already installed (no downloads), in stages that each write their results into OUTDIR
# as soon as they end: OUTDIR/summary.md (what ran, passed, failed, timed out, the
# headline numbers so far), OUTDIR/summary.json, and OUTDIR/gpu_check.tgz (every log,
# junit file, CSV and chart), all three rewritten after every stage.  A timeout or
# failure in one stage never loses the stages before it; a failed build skips only what
# needs the extension.  The stages are scripts/gpu_check.py's.
#
#   scripts/gpu_check.sh [--dry-run] [OUTDIR]      PYTHON=python3 by default
#
# Budget: one budget of 360 s (GPU_CHECK_BUDGET) for every stage after the machine's
# start-up, under the device tool's 10 minutes a command and 15 minutes in all.  Stages
# run headline numbers first; each has a timeout that covers all it runs (collection,
# shards, reports), and the timeouts add up to the budget.  scripts/gpu_check.py's PLAN
# holds the numbers (expected s / timeout s, from the H200 runs of 2026-12-04; `make gpu-check-dry` writes this plan into summary.json):
#
#   env            7  [10]   versions, GPU name, capability, SMs, memory
#   build         10  [20]   GPU_CHECK_PREBUILT=1: the library built here against that torch (make
#                            test-compat); else setup.py build_ext --inplace for the detected
#                            capability only (fails there today: GCC 13, kernels_avx2.cpp),
#                            MAX_JOBS = all cores; then the cubins' register/stack/spill
#                            report (tests/gpu_ready/test_cuda_build.py)
#   smoke         19  [25]   scripts/gpu_smoke.py: every op and dtype on cpp and triton vs the
#                            reference, one capture+replay per backend
#   bench_ops     22  [30]   benchmarks/bench_ops.py --device cuda --quick: fused ops vs torch,
#                            the GPU's copy bandwidth as the roofline
#   bench_meta    38  [50]   benchmarks/bench_meta_iteration.py --quick --no-memory, omniglot,
#                            modes seed, l2l, sequential, batched, graph; cpp then triton
#   cpp_tests     66  [80]   pytest -m gpu -k "not triton", one shard per core
#   triton_tests  72  [90]   pytest -m gpu -k triton, one shard per core; REPTILE_FUSED_TRITON_TUNE=single
#                            (no autotuning: tests/gpu_ready/test_triton_compile_budget.py
#                            bounds the compiles it needs)
#   bench_eval    20  [25]   benchmarks/bench_eval.py --cuda-graph: evaluation tasks/s,
#                            sequential, batched, batched as a CUDA graph
#
# A stage out of time gets SIGINT, then SIGKILL 5 s later; pytest outcomes and benchmark
# rows are streamed as they are produced, so what it measured stays.
#
# The architecture is the local GPU's: TORCH_CUDA_ARCH_LIST and MAX_JOBS are detected
# here unless the caller set them (the Makefile no longer passes its 9.0 / 2 defaults).
#
# --dry-run (no GPU needed; tests/gpu_ready/test_gpu_check.py runs it in `make test`):
# the same stages and files on the CPU, without the build, the pytest stages on one small
# file (the GPU tests skip), the smoke stage at tiny sizes, the benchmarks as stand-ins.
#
# With --wheel (issue 8; `make gpu-check-wheel`), the GPU tests run from an installed
# wheel instead of the source tree: build the CUDA wheel for the local GPU (or for
# TORCH_CUDA_ARCH_LIST) with `pip wheel --no-build-isolation --no-deps`, then
# scripts/wheel_check.py installs it into a new venv that reuses this machine's torch,
# checks it (kernels, ops vs reference on CPU and GPU, cuobjdump arch list) and runs
# `pytest -m gpu` on a copy of tests/ against it.  No benchmark.  Budget: about 6 minutes.
#
#   scripts/gpu_check.sh --wheel [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=staged
case "${1:-}" in
  --wheel) MODE=wheel; shift ;;
  --dry-run) MODE=dry; shift ;;
esac
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY"

if [ "$MODE" = staged ]; then exec "$PY" scripts/gpu_check.py "$OUT"; fi
if [ "$MODE" = dry ]; then exec "$PY" scripts/gpu_check.py --dry-run "$OUT"; fi

"$PY" - <<'PY' 2>&1 | tee "$OUT/gpu_env.txt"
import torch
assert torch.cuda.is_available(), "gpu_check: no CUDA device visible"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

# Local GPU only: its compute capability, unless the caller chose.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
fi
export TORCH_CUDA_ARCH_LIST REPTILE_FUSED_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

start=$(date +%s)
rm -rf "$OUT/dist"
if ! "$PY" -m pip wheel --no-build-isolation --no-deps -w "$OUT/dist" . >"$OUT/gpu_wheel_build.log" 2>&1; then
  echo "gpu_check: wheel build failed, see $OUT/gpu_wheel_build.log"; tail -30 "$OUT/gpu_wheel_build.log"; exit 3
fi
echo "wheel build: $(( $(date +%s) - start )) s for arch $TORCH_CUDA_ARCH_LIST: $(ls "$OUT"/dist)" | tee -a "$OUT/gpu_env.txt"
timeout 600 "$PY" scripts/wheel_check.py "$OUT/dist" --flavour cuda --source . --archs "$TORCH_CUDA_ARCH_LIST" \
  --pytest "-q -m gpu -rfE tests" 2>&1 | tee "$OUT/gpu_wheel_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check --wheel: exit $status (0 = all passed)"
exit "$status"
