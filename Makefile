# The README's two commands: `make setup` (environment + build + demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup install data test bench cmake-check cuda-check gpu-check-dry clean

# The main job: `sparsestart train` with its short default (Fashion-MNIST, which `data` installs,
# else scikit-learn digits; convnet_small at density 0.1, ERK, RigL; under a minute on 2 cores).
setup: install data
	$(VENV)/bin/sparsestart train

# Fashion-MNIST, the main job's dataset, from Debian's package dataset-fashion-mnist (apt-get, with
# sudo when not root; `apt-get update` and again if the first try fails), as .ci/run does. When it
# cannot be installed this says why and how to get it, and setup goes on with the digits fallback.
# SPARSESTART_SYSTEM_DATA=0 (ignore the system copy) skips it.
DATA_PKG := dataset-fashion-mnist
data:
	@case "$${SPARSESTART_SYSTEM_DATA:-1}" in 0|no|off|false) \
	  echo "data: SPARSESTART_SYSTEM_DATA=$$SPARSESTART_SYSTEM_DATA: not installing $(DATA_PKG)"; exit 0;; esac; \
	if dpkg -s $(DATA_PKG) >/dev/null 2>&1; then echo "data: $(DATA_PKG) is installed"; exit 0; fi; \
	why=""; SUDO=""; \
	if ! command -v apt-get >/dev/null 2>&1; then why="apt-get not found (not Debian/Ubuntu)"; \
	elif [ "$$(id -u)" -ne 0 ]; then \
	  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else why="not root and sudo not found"; fi; fi; \
	if [ -z "$$why" ]; then \
	  echo "data: installing $(DATA_PKG) (Fashion-MNIST) with $${SUDO:+sudo }apt-get"; \
	  $$SUDO apt-get install -y -q $(DATA_PKG) || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $(DATA_PKG); } \
	    || why="apt-get install $(DATA_PKG) failed (see above)"; \
	fi; \
	if [ -n "$$why" ]; then \
	  echo "data: could not install Fashion-MNIST: $$why."; \
	  echo "data: the main job falls back to scikit-learn's digits (10 epochs, clearly marked FALLBACK)."; \
	  echo "data: to get the real data: sudo apt-get install $(DATA_PKG), or put the four idx files"; \
	  echo "data: (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,"; \
	  echo "data: t10k-labels-idx1-ubyte.gz) into DIR and set SPARSESTART_DATA=DIR; then: $(VENV)/bin/sparsestart train"; \
	else echo "data: $(DATA_PKG) installed"; fi

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
