#!/usr/bin/env bash
# GPU validation for issue 3 (`make gpu-check`): on a machine with a CUDA GPU and
# torch already installed (no downloads), build the extension in place for the local
# GPU only, run every gpu-marked test, then the op benchmark with reduced repeats.
# Logs, CSV, chart and summary go to OUTDIR (default benchmarks/results).
# Budget: about 8 minutes (build ~1-3 min, tests <= 200 s, benchmarks <= 270 s).
#
#   scripts/gpu_check.sh [OUTDIR]        PYTHON=python3 by default
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
WHEEL_MODE=0
if [ "${1:-}" = "--wheel" ]; then WHEEL_MODE=1; shift; fi
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

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

if [ "$WHEEL_MODE" = 1 ]; then
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
fi

start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >"$OUT/gpu_build.log" 2>&1; then
  echo "gpu_check: build failed, see $OUT/gpu_build.log"; tail -30 "$OUT/gpu_build.log"; exit 3
fi
echo "build: $(( $(date +%s) - start )) s for arch $TORCH_CUDA_ARCH_LIST" | tee -a "$OUT/gpu_env.txt"

# Every gpu-marked test (op cases on CUDA, CUDA-graph replay, opcheck on CUDA, launches,
# compiled Triton, batched-mode graph capture).
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests -rfE 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=4

# Benchmarks with reduced repeats: the fused ops (cpp vs PyTorch primitives, copy roofline),
# the Triton column, and meta-iterations per second of every training mode.
timeout 120 "$PY" benchmarks/bench_ops.py --device cuda --quick --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=5
timeout 60 "$PY" benchmarks/bench_triton.py --sizes 1048576 16777216 67108864 --dtypes float32 \
  --out "$OUT/triton_cuda.csv" 2>&1 | tee -a "$OUT/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=5
timeout 110 "$PY" benchmarks/bench_meta_iteration.py --device cuda --quick --nets omniglot \
  --modes seed,l2l,sequential,sequential_cl,batched,graph,floor \
  --out "$OUT/meta_iteration_cuda.csv" 2>&1 | tee -a "$OUT/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=5

# The device tool brings back at most 8 files: GPU_CHECK_TAR=1 packs everything into one.
if [ "${GPU_CHECK_TAR:-0}" = 1 ]; then
  tar czf "$OUT.tgz" -C "$OUT" . && rm -rf "$OUT" && mkdir -p "$OUT" && mv "$OUT.tgz" "$OUT/gpu_check.tgz"
fi
echo "gpu_check: exit $status (0 = all passed)"
exit $status
