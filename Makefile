# Quick start:  make bench   (the benchmark)   |   make test   (the test suite)
#   make bench       the headline setups (two of the seed's MLPs, a transformer, a CNN) and the
#                    kernels' large shapes: about 2 minutes on 2 CPU cores
#   make bench-all   the full sweep (bench/run.py --all, bench/kernels.py --all)
# They create or reuse the virtual environment $(VENV), install torch there if it has none
# (the CUDA 13.0 build of torch 2.14.1 when nvcc is present, so the CUDA kernels get
# compiled; else the CPU build of torch 2.13.0), build the extension against it, and run.
#   make lint        ruff and clang-format over the tree (.pre-commit-config.yaml pins them)
#   make hooks       the same checks as a git pre-commit hook
#   make wheel       dist/indivgrad_cuda-<version>+pt<torch><cuda>-*.whl, built against $(VENV)'s torch
#   make wheel-test  that wheel installed into a fresh venv, imported and run (tests/test_wheel.py)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_WITH_NVCC ?= torch==2.14.1
TORCH_WITHOUT_NVCC ?= torch==2.13.0
BUILT := $(VENV)/.indivgrad-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*)
PRE_COMMIT := pre-commit==4.7.0

.PHONY: test bench bench-all build lint hooks wheel wheel-test clean

# pre-commit too: tests/test_lint.py and test_gpu_check.py's shellcheck run the hooks
test: $(BUILT) $(VENV)/.pre-commit
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(PY) bench/run.py
	$(PY) bench/kernels.py

bench-all: $(BUILT)
	$(PY) bench/run.py --all
	$(PY) bench/kernels.py --all

build: $(BUILT)

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.pre-commit: | $(PY)
	$(PIP) install $(PRE_COMMIT)
	touch $@

# The hooks fix what they can (formatting, import order), so a red run leaves the fix in the tree.
lint: $(VENV)/.pre-commit
	$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

hooks: $(VENV)/.pre-commit
	$(VENV)/bin/pre-commit install

wheel: $(VENV)/.torch
	rm -f dist/indivgrad_cuda-*.whl
	$(PIP) wheel --no-build-isolation --no-deps -w dist .

wheel-test: wheel $(BUILT)
	INDIVGRAD_WHEEL="$$(ls dist/indivgrad_cuda-*.whl)" $(PY) -m pytest -q tests/test_wheel.py

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install $$(command -v nvcc >/dev/null && echo $(TORCH_WITH_NVCC) || echo $(TORCH_WITHOUT_NVCC))
	$(PIP) install setuptools wheel ninja
	touch $@

# Rebuilt when a source changes; the extras bring pytest and the bench's competitors.
$(BUILT): $(VENV)/.torch $(SOURCES)
	$(PIP) install --no-build-isolation -e ".[test,bench]"
	touch $@

clean:
	rm -rf build dist *.egg-info indivgrad_cuda/_C*.so indivgrad_cuda/_build_info.json $(BUILT)
