# The README's two commands: `make setup` (environment + build + demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup install test bench cmake-check cuda-check gpu-check-dry clean

# The main job: `sparsestart train` with its short default (Fashion-MNIST if installed,
# else scikit-learn digits; convnet_small at density 0.1, ERK, RigL; a few minutes on 2 cores).
setup: install
	$(VENV)/bin/sparsestart train

# torch is pinned to the CPU build that lies on disk; the package is built with
# --no-build-isolation so it compiles against that torch instead of pulling a
# (multi-GB, CUDA) torch into an isolated build environment.
install:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation -e .

test:
	$(PY) -m pytest -q tests

bench:
	$(PY) -m bench

# Configure and build the C++ sources with CMake as well (CUDA sources with SPARSESTART_CUDA=ON).
cmake-check:
	cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(abspath $(PY)) $(CMAKE_ARGS)
	cmake --build build/cmake -j2

# Compile csrc/cuda/*.cu with nvcc for sm_80/sm_90; fails on any register spill.
cuda-check:
	PYTHON=$(abspath $(PY)) scripts/check_ptxas.sh

# scripts/gpu_check.sh without a GPU: the Triton kernels through the interpreter, the GPU
# benchmark and training code paths on CPU tensors (on a GPU machine run scripts/gpu_check.sh).
gpu-check-dry:
	PYTHON=$(abspath $(PY)) STEPS=env,backends,tests,kbench,bench,train scripts/gpu_check.sh --dry-run --out build/gpu-check-dry

clean:
	rm -rf build *.egg-info sparsestart/_C*.so
