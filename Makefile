# The two commands of the README, each installing what it needs on a fresh machine:
#   make bench   the benchmark (CUDA when a GPU is visible, else CPU)
#   make test    the test suite (every device present)
PYTHON ?= python
# torch==2.13.0 is the CPU build on the project's machines; any installed torch >= 2.4 is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test fuzz bench cuda-compile cuda-emulate sass-report clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet "setuptools>=64" wheel ninja pytest numpy expecttest hypothesis
	# --no-build-isolation: compile against the torch installed above, not a second one.
	$(PYTHON) -m pip install --no-build-isolation -e .

test: install
	$(PYTHON) -m pytest -q tests

# The randomized differential tests' long profile (tests/test_fuzz.py): ~24,000 cases.
fuzz: install
	TL_FUZZ_PROFILE=fuzz $(PYTHON) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

bench: install
	$(PYTHON) -m pip install --quiet matplotlib || true
	$(PYTHON) benchmarks/bench.py

# Every .cu compiles without a GPU and without torch headers (seconds each).
cuda-compile:
	@for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f"; \
	  nvcc -std=c++17 -O3 -c -Icsrc -gencode=arch=compute_80,code=sm_80 \
	       -gencode=arch=compute_90,code=sm_90 -o /dev/null $$f || exit 1; \
	done

# The CUDA kernels run on the CPU under the emulator of tests/cuda_emu (no GPU, no nvcc, no
# build of the extension; needs g++, torch and pytest): compile ~20 s (cached), tests ~2.5 min.
cuda-emulate:
	$(PYTHON) -m pytest -q -rfE tests/test_cuda_emu.py

# Registers, spills and SASS instructions per element of every kernel's hot loop (nvcc, no GPU;
# method in scripts/sass_report.py). Self-contained: installs cuobjdump and nvdisasm itself.
sass-report:
	$(PYTHON) -m pip install --quiet nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
	$(PYTHON) scripts/sass_report.py

clean:
	rm -rf build *.egg-info torch_losses/*.so
