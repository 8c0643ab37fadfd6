# Quick start:  make bench   (the benchmark)   |   make test   (the test suite)
# Both create or reuse the virtual environment $(VENV), install torch there if it has none
# (the CUDA 13.0 build of torch 2.14.1 when nvcc is present, so the CUDA kernels get
# compiled; else the CPU build of torch 2.13.0), build the extension against it, and run.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_WITH_NVCC ?= torch==2.14.1
TORCH_WITHOUT_NVCC ?= torch==2.13.0
BUILT := $(VENV)/.indivgrad-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: test bench build clean

test: $(BUILT)
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(PY) bench/run.py
	$(PY) bench/kernels.py

build: $(BUILT)

$(VENV)/.torch:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install $$(command -v nvcc >/dev/null && echo $(TORCH_WITH_NVCC) || echo $(TORCH_WITHOUT_NVCC))
	$(PIP) install setuptools wheel ninja
	touch $@

# Rebuilt when a source changes; the extras bring pytest and the bench's competitors.
$(BUILT): $(VENV)/.torch $(SOURCES)
	$(PIP) install --no-build-isolation -e ".[test,bench]"
	touch $@

clean:
	rm -rf build *.egg-info indivgrad_cuda/_C*.so indivgrad_cuda/_build_info.json $(BUILT)
