# The two commands of the README, each setting up what it needs on a fresh machine:
#   make bench   the benchmark (CUDA when a GPU is visible, else CPU); options: BENCH_ARGS="--quick"
#   make test    the test suite (every device present); options: PYTEST_ARGS="-x -k huber"
# Python: the active virtual environment when there is one ($VIRTUAL_ENV), else a project venv
# in .venv, made with python3 on first use (so a system Python that refuses pip installs, PEP 668,
# is never touched). VENV=path picks another venv folder.
# Rebuilds: the package is installed once per venv (pip install -e); after that only changed C++
# sources are recompiled (ninja's objects stay in build/temp-<torch>-<python>/).
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PYTHON := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on the project's machines; an installed torch is kept.
TORCH_SPEC ?= torch==2.13.0
# The newest torch the tests ran on (make test-newest-torch), in its own venv; the oldest (make
# test-oldest-torch): the torch of the GPU machines' image, from PyPI (a CUDA build, ~5 GB).
NEWEST_TORCH ?= 2.14.1
OLDEST_TORCH ?= 2.11.0
TEST_TOOLS ?= pytest numpy expecttest hypothesis
# pyproject.toml's build floor; torch 2.11 asks for setuptools<82 (test-oldest-torch).
SETUPTOOLS_SPEC ?= setuptools>=77
PYTEST_ARGS ?=
BENCH_ARGS ?=
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
INSTALLED := $(VENV)/.torch_losses-installed

.PHONY: help install test fuzz bench bench-linear-ce test-newest-torch test-oldest-torch cuda-compile cuda-build cuda-emulate sass-report clean
.DEFAULT_GOAL := help

help:
	@echo "make test    the test suite (PYTEST_ARGS=\"-x -k huber\" passes options to pytest)"
	@echo "make bench   the benchmark (BENCH_ARGS=\"--quick\" passes options to benchmarks/bench.py)"
	@echo "make bench-linear-ce   linear + cross-entropy (LLM head) time and memory"
	@echo "make fuzz    the randomized differential tests' long profile (~24,000 cases)"
	@echo "make cuda-emulate   the CUDA kernels on the CPU emulator (also part of make test)"
	@echo "make cuda-build   the whole extension with CUDA (sm_90) against torch $(OLDEST_TORCH)+cu130, loaded without a GPU"
	@echo "make sass-report   registers, spills and SASS instructions per element of every CUDA kernel"
	@echo "make test-newest-torch   the suite on torch $(NEWEST_TORCH), in .venv-torch-$(NEWEST_TORCH)"
	@echo "make test-oldest-torch   the suite on torch $(OLDEST_TORCH) (the GPU image's), in .venv-torch-$(OLDEST_TORCH)"
	@echo "Python: $(VENV) (the active venv, else .venv, created with python3 when missing)"

$(PYTHON):
	@echo "make: no active virtual environment: creating $(VENV) with python3 (activate a venv to use it instead)"
	python3 -m venv $(VENV)

# torch and the build tools (once per venv).
$(VENV)/.tools-installed: | $(PYTHON)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet "$(SETUPTOOLS_SPEC)" wheel ninja
	touch $@

# The test tools (once per venv; make bench does not need them).
$(VENV)/.test-tools-installed: | $(PYTHON)
	$(PYTHON) -m pip install --quiet $(TEST_TOOLS)
	touch $@

# --no-build-isolation: compile against the torch installed above, not a second one.
$(INSTALLED): $(VENV)/.tools-installed setup.py pyproject.toml $(CSRC)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	touch $@

# The in-place extension is shared by every venv of this clone: rebuild when the last build was
# for another torch (import names both versions then).
install: $(INSTALLED)
	@$(PYTHON) -c "import torch_losses" 2>/dev/null || { \
	  echo "make: the extension was built for another torch: rebuilding"; \
	  $(PYTHON) -m pip install --no-build-isolation --no-deps -e . ; }

test: install $(VENV)/.test-tools-installed
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# The randomized differential tests' long profile (tests/test_fuzz.py): ~24,000 cases.
fuzz: install $(VENV)/.test-tools-installed
	TL_FUZZ_PROFILE=fuzz $(PYTHON) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

bench: install
	$(PYTHON) -m pip install --quiet matplotlib || true
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)

# Linear layer + cross-entropy (LLM head): ours vs torch's reference and chunked paths (and
# Liger on a GPU), time and peak extra memory; BENCH_ARGS="--size 2048 1024 32000" etc.
bench-linear-ce: install
	$(PYTHON) benchmarks/bench.py --loss linear_ce $(BENCH_ARGS)

# The suite on the newest torch the registry serves (CPU-only build of ours: faster, and the
# CUDA sources are compiled by cuda-compile anyway).
test-newest-torch:
	TORCH_LOSSES_CUDA=0 $(MAKE) test VENV=.venv-torch-$(NEWEST_TORCH) \
	  TORCH_SPEC=torch==$(NEWEST_TORCH) PYTEST_ARGS="--ignore-glob='tests/test_cuda_emu*.py' $(PYTEST_ARGS)"

# The same on the oldest torch the suite passes on: the GPU image's, so that the one GPU call
# never meets a torch the suite has not run on.
test-oldest-torch:
	TORCH_LOSSES_CUDA=0 $(MAKE) test VENV=.venv-torch-$(OLDEST_TORCH) \
	  TORCH_SPEC=torch==$(OLDEST_TORCH) SETUPTOOLS_SPEC="setuptools>=77,<82" PYTEST_ARGS="--ignore-glob='tests/test_cuda_emu*.py' $(PYTEST_ARGS)"

# Every .cu compiles without a GPU and without torch headers (20-80 s each for both archs), as
# many at a time as there are cores; the first failure stops the rest.
cuda-compile:
	@ls csrc/cuda/*.cu | xargs -P "$$(nproc)" -I{} sh -c \
	  'echo "nvcc {}"; nvcc -std=c++17 -O3 -c -Icsrc -gencode=arch=compute_80,code=sm_80 \
	     -gencode=arch=compute_90,code=sm_90 -o /dev/null {} || exit 255'

# The whole extension with its CUDA part (the C++ glue and the kernels, sm_90) against torch
# $(OLDEST_TORCH), the GPU image's torch (a CUDA build), as scripts/gpu_check.sh builds it there:
# a wheel in build/cuda-wheel, unpacked and loaded without a GPU (every op with a CPU kernel must
# have its CUDA kernel). make test builds the CPU part only, cuda-compile the .cu files alone.
CUDA_BUILD_VENV := .venv-torch-$(OLDEST_TORCH)
cuda-build:
	$(MAKE) $(CUDA_BUILD_VENV)/.tools-installed VENV=$(CUDA_BUILD_VENV) \
	  TORCH_SPEC=torch==$(OLDEST_TORCH) SETUPTOOLS_SPEC="setuptools>=77,<82"
	rm -rf build/cuda-wheel
	TORCH_LOSSES_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 $(CUDA_BUILD_VENV)/bin/python -m pip wheel \
	  --no-build-isolation --no-deps -w build/cuda-wheel .
	$(CUDA_BUILD_VENV)/bin/python -m zipfile -e build/cuda-wheel/torch_losses-*.whl build/cuda-wheel/site
	$(CUDA_BUILD_VENV)/bin/python scripts/check_cuda_build.py build/cuda-wheel/site

# The CUDA kernels run on the CPU under the emulator of tests/cuda_emu (no GPU, no nvcc, no
# build of the extension; needs g++, torch and pytest): compile ~20 s (cached), tests ~2.5 min,
# then the randomized differential tests on the kernels (~1 min; TL_FUZZ_PROFILE=fuzz for more).
cuda-emulate: $(VENV)/.tools-installed $(VENV)/.test-tools-installed
	$(PYTHON) -m pytest -q -rfE tests/test_cuda_emu*.py

# Registers, spills and SASS instructions per element of every kernel's hot loop (nvcc, no GPU;
# method in scripts/sass_report.py). Self-contained: installs cuobjdump and nvdisasm itself.
sass-report: | $(PYTHON)
	$(PYTHON) -m pip install --quiet nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
	$(PYTHON) scripts/sass_report.py

clean:
	rm -rf build *.egg-info torch_losses/*.so torch_losses/_build_info.py
