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
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.deps-stamp
PROJECT_STAMP := $(VENV)/.project-stamp
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: install test demo bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Build requirements first: the editable install compiles against this torch
# (--no-build-isolation), so it must already be in the venv.
$(DEPS_STAMP): $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'torch>=2.6' setuptools wheel ninja pybind11 build
	touch $@

$(PROJECT_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,demo,triton]'
	touch $@

install: $(PROJECT_STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m reptile_fused demo

bench: install
	$(PY) benchmarks/bench_reference.py
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_distributed.py

# On a lent GPU machine: uses the torch already installed there (no venv, no
# downloads), builds in place for the local GPU, runs every gpu-marked test and the
# benchmarks with reduced repeats, and writes logs/CSV/charts to $(OUT).
OUT ?= benchmarks/results
gpu-check:
	PYTHON=$${PYTHON:-python3} scripts/gpu_check.sh $(OUT)

clean:
	rm -rf build dist *.egg-info reptile_fused/*.so reptile_fused/_build_info.py
