#!/usr/bin/env bash
# Build and test against one torch/Triton pair in a venv of its own (`make test-compat`).
#
#   scripts/test_compat.sh TORCH TRITON [OUTDIR]
#     e.g. scripts/test_compat.sh 2.11.0 3.6.0     (the GPU machine's pair)
#   COMPAT_PYTHON   the interpreter of the venv (default python3; the GPU machine runs 3.12)
#   COMPAT_VENV     the venv (default .venv-compat/torch<TORCH>-triton<TRITON>-py<X.Y>);
#                   created and filled when missing
#   COMPAT_ARCHS    CUDA architectures of the build (default 9.0, the GPU machine's)
#
# What it does, all against that pair and nothing from the project's own .venv:
#   1. installs torch==TORCH and triton==TRITON (and the test requirements) into the venv;
#      pip's machine-wide cap on torch is not applied there (PIP_CONFIG_FILE=/dev/null),
#      so releases newer than the one on this disk can be tested too;
#   2. copies the tracked source tree to OUTDIR/src and builds the CUDA wheel there
#      (REPTILE_FUSED_CUDA=1: nvcc compiles the CUDA kernels, no GPU needed) with the
#      C++ standard that torch passes (C++17 for torch 2.11);
#   3. scripts/wheel_check.py: the wheel installs into a fresh venv over that torch, its
#      ops all have CPU and CUDA kernels, the CPU ops match the reference, the cubins are
#      exactly COMPAT_ARCHS; then, against the installed wheel, the CPU op, optimizer and
#      batched tests, and the Triton kernels compiled ahead of time for sm_90 with that
#      Triton (tests/gpu_ready/test_triton_aot.py).
# Prints one line per step and writes OUTDIR/report.txt (default build/compat/<pair>).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${1:?usage: scripts/test_compat.sh TORCH TRITON [OUTDIR]}"
TRITON="${2:?usage: scripts/test_compat.sh TORCH TRITON [OUTDIR]}"
PYTHON="${COMPAT_PYTHON:-python3}"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PAIR="torch${TORCH}-triton${TRITON}-py${PYVER}"
VENV="${COMPAT_VENV:-.venv-compat/$PAIR}"
OUT="${3:-build/compat/$PAIR}"
ARCHS="${COMPAT_ARCHS:-9.0}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPORT="$OUT/report.txt"
: >"$REPORT"
say() { echo "test-compat $PAIR: $*" | tee -a "$REPORT"; }
started=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
# Triton before 3.7 interprets a loop bound with int() of a one-element array, which
# NumPy 2.4 refuses (2.2.6 only warns): its CPU interpreter, which the tests use, needs
# an older NumPy.
NUMPY="numpy"
case "$TRITON" in 3.[0-6].*) NUMPY="numpy<2.3" ;; esac
PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --disable-pip-version-check \
  "torch==$TORCH" "triton==$TRITON" setuptools wheel ninja pybind11 build \
  "$NUMPY" tqdm pillow pytest hypothesis expecttest
say "venv $VENV: $("$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"

rm -rf "$OUT/src" "$OUT/dist"
mkdir -p "$OUT/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$OUT/src"
t=$(date +%s)
if ! (cd "$OUT/src" && REPTILE_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-2}" \
      "$PY" -m build --wheel --no-isolation --outdir "$OUT/dist" >"$OUT/build.log" 2>&1); then
  say "FAILED: the CUDA build, see $OUT/build.log"
  grep -E "error|Error" "$OUT/build.log" | head -20 | tee -a "$REPORT"
  exit 1
fi
std="$(grep -o -- '-std=c++[0-9]*' "$OUT/build.log" | sort | uniq -c | tr '\n' ' ')"
say "built $(ls "$OUT/dist") in $(( $(date +%s) - t )) s for arch $ARCHS (standard flags seen: $std)"

t=$(date +%s)
tests="-q -m 'not gpu and not wheel' tests/ops tests/optimizer tests/test_batched.py tests/gpu_ready/test_triton_aot.py"
set +e
"$PY" scripts/wheel_check.py "$OUT/dist" --flavour cuda --archs "$ARCHS" --source . \
  --pytest "$tests" >"$OUT/check.log" 2>&1
status=$?
set -e
summary="$(grep -E '^[0-9]+ (passed|failed)|=+ .*(passed|failed|error).* =+$' "$OUT/check.log" | tail -1)"
say "wheel check and tests: exit $status in $(( $(date +%s) - t )) s: ${summary:-see $OUT/check.log}"
say "total $(( $(date +%s) - started )) s; log files in $OUT"
exit "$status"
