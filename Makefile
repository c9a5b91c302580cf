# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv if missing and installs everything the project needs into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Build the CUDA half of the extension whenever a toolkit is here; one GPU
# architecture keeps development and CI builds fast (wheels use the full list).
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# `make wheel` compiles for TORCH_CUDA_ARCH_LIST when you set it (environment or
# command line), else for setup.py's fat default list; never for the 9.0 below.
WHEEL_ARCHS := $(if $(filter environment% command%,$(origin TORCH_CUDA_ARCH_LIST)),$(TORCH_CUDA_ARCH_LIST))
# `make gpu-check` builds for the local GPU with every core: it passes these on only
# when the caller set them (environment or command line), never the defaults below.
GPU_ARCHS := $(if $(filter environment% command%,$(origin TORCH_CUDA_ARCH_LIST)),$(TORCH_CUDA_ARCH_LIST))
GPU_JOBS := $(if $(filter environment% command%,$(origin MAX_JOBS)),$(MAX_JOBS))
GPU_CHECK_ENV := env $(if $(GPU_ARCHS),,-u TORCH_CUDA_ARCH_LIST) $(if $(GPU_JOBS),,-u MAX_JOBS) \
	$(if $(GPU_ARCHS),TORCH_CUDA_ARCH_LIST='$(GPU_ARCHS)') $(if $(GPU_JOBS),MAX_JOBS='$(GPU_JOBS)')
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.deps-stamp
PROJECT_STAMP := $(VENV)/.project-stamp
CSRC := csrc
BUILD_INPUTS := setup.py pyproject.toml $(wildcard $(CSRC)/* $(CSRC)/*/*)

.PHONY: install test test-compat docs docs-serve demo bench gpu-check gpu-check-dry gpu-check-wheel wheel wheel-cpu wheel-check wheel-check-cuda clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Build requirements first: the editable install compiles against this torch
# (--no-build-isolation), so it must already be in the venv.
$(DEPS_STAMP): $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'torch>=2.11' setuptools wheel ninja pybind11 build
	touch $@

$(PROJECT_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,demo,triton,docs]'
	touch $@

# The oldest supported torch's headers, for the C++17 guard (tests/test_cxx17.py):
# newer torch headers are C++20 themselves.  Only torch/include is kept from its wheel.
OLDEST_TORCH := 2.11.0
CXX17_TORCH := $(VENV)/torch-$(OLDEST_TORCH)-headers
$(CXX17_TORCH)/.stamp: $(DEPS_STAMP)
	rm -rf $(CXX17_TORCH) $(CXX17_TORCH).download
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(CXX17_TORCH).download torch==$(OLDEST_TORCH)
	$(PY) scripts/unpack_headers.py $(CXX17_TORCH).download/torch-*.whl $(CXX17_TORCH)
	rm -rf $(CXX17_TORCH).download
	touch $@

install: $(PROJECT_STAMP)

# ruff check, the test suite, then every Python code block of README.md and docs/*.md (pytest-markdown-docs;
# a block fenced ```python notest is shown, not run), then the documentation site (`docs`).
# The code blocks run on one CPU thread: their nets are tiny, and on a small shared machine
# a second thread makes them several times slower.
test: install $(CXX17_TORCH)/.stamp
	$(PY) -m ruff check .
	REPTILE_FUSED_CXX17_TORCH=$(CXX17_TORCH) $(PY) -m pytest -q
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --markdown-docs README.md docs
	$(MAKE) --no-print-directory docs

# The documentation site (mkdocs.yml, pages in docs/, API reference from the docstrings) into
# site/, in strict mode: any warning (a broken link or anchor, a page missing from the nav, a
# docstring mkdocstrings cannot read) fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

demo: install
	$(PY) -m reptile_fused demo

# Build with the CUDA kernels and test against another torch/Triton pair, in a venv of
# its own (scripts/test_compat.sh): `make test-compat TORCH=2.11.0 TRITON=3.6.0` is the
# GPU machine's pair, the oldest supported; COMPAT_PYTHON=python3.12 matches its Python.
TORCH ?= 2.11.0
TRITON ?= 3.6.0
test-compat:
	scripts/test_compat.sh $(TORCH) $(TRITON)

# Every script writes rows of one schema into benchmarks/results/benchmarks.csv
# (benchmarks/harness.py); report.py regenerates the tables of docs/benchmarks.md from it.
bench: install
	$(PY) benchmarks/bench_ops.py --threads 1
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/report.py --page docs/benchmarks.md

# On a lent GPU machine: uses the torch already installed there (no venv, no
# downloads), builds in place for the local GPU's architecture with every core, then
# runs the stages of scripts/gpu_check.sh (headline benchmarks first, then the cpp and
# Triton GPU tests), each writing $(OUT)/summary.md, summary.json and gpu_check.tgz as
# it ends, all within one budget of 360 s.
OUT ?= benchmarks/results
gpu-check:
	$(GPU_CHECK_ENV) PYTHON=$${PYTHON:-python3} scripts/gpu_check.sh $(OUT)

# The same stages on a machine without a GPU (what tests/gpu_ready/test_gpu_check.py runs).
gpu-check-dry: install
	PYTHON=$(PY) scripts/gpu_check.sh --dry-run $(OUT)

# Same machine, the GPU tests run from an installed CUDA wheel instead (issue 8).
gpu-check-wheel:
	$(GPU_CHECK_ENV) PYTHON=$${PYTHON:-python3} scripts/gpu_check.sh --wheel $(OUT)

# Wheels (docs/wheels.md), built against the venv's torch, into $(WHEEL_DIR).
# `make test` builds and checks the CPU wheel itself (tests/test_wheel.py).
WHEEL_DIR ?= dist
wheel: $(DEPS_STAMP)
	$(if $(WHEEL_ARCHS),TORCH_CUDA_ARCH_LIST='$(WHEEL_ARCHS)',env -u TORCH_CUDA_ARCH_LIST) REPTILE_FUSED_CUDA=1 \
		$(PY) -m build --wheel --no-isolation --outdir $(WHEEL_DIR)

wheel-cpu: $(DEPS_STAMP)
	REPTILE_FUSED_CUDA=0 $(PY) -m build --wheel --no-isolation --outdir $(WHEEL_DIR)

wheel-check: wheel-cpu
	$(PY) scripts/wheel_check.py $(WHEEL_DIR) --flavour cpu --source .

# Slow on a small builder (every architecture is compiled): not part of `make test`.
wheel-check-cuda: wheel
	$(PY) scripts/wheel_check.py $(WHEEL_DIR) --flavour cuda --source . $(if $(WHEEL_ARCHS),--archs '$(WHEEL_ARCHS)')

clean:
	rm -rf build dist wheelhouse site *.egg-info reptile_fused/*.so reptile_fused/_build_info.py
