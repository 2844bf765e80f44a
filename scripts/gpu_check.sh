#!/usr/bin/env bash
# Verify a CUDA machine in one command (issue 13): build sparsestart with its CUDA kernels,
# run the GPU tests and the Triton tests compiled (not interpreted), the kernel benchmark,
# the GPU layer/training benchmarks at few rounds, and a one-epoch training run on the GPU.
# Prints one summary table and writes every step's log to the output folder.
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run]
#
#   --out DIR     logs, results and summary.txt (default build/gpu-check)
#   --dry-run     no GPU: the same steps on CPU, tiny sizes: the Triton kernels through the
#                 interpreter (TRITON_INTERPRET=1), the benchmark and training code paths on
#                 CPU tensors; CI runs this (make gpu-check-dry)
#   STEPS=env,build,backends,tests,kbench,bench,train    the steps to run (default all); split a
#                 long check into two calls, e.g. STEPS=env,build,backends,tests then STEPS=kbench,bench,train
#                 Opt-in step compile (in the dry run's default): the training bench's MLP (ERK 0.1, bf16,
#                 BSR-32) with every variant torch.compile'd, and a one-epoch `train --compile`: does
#                 compiling take the host time out of the GPU steps? (~2-3 min; add it when time allows)
#   AUTOTUNE=0|1  Triton autotune lists for the tests (default 0: one config per kernel,
#                 seconds instead of minutes of compiling); benchmarks always autotune
#   PYTHON=...    the interpreter with torch and triton (default: python3, or .venv's when it exists)
#   DATA_DIR=...  Fashion-MNIST idx files for the training step (default: digits when absent)
#   JOBS=N        pytest-xdist workers for the GPU tests (default 4 when xdist is installed)
#   TEST_TIMEOUT  seconds one GPU test may take before it fails (default 120; pytest-timeout)
#   LIMIT_TESTS / LIMIT_KBENCH / LIMIT_BENCH / LIMIT_TRAIN / LIMIT_COMPILE   time limits (s) of those steps on the GPU
#   BENCH_BUDGET  seconds after which the GPU bench starts no new case (default 200)
#
# Fits in 8 minutes on one H100/H200 with a cold Triton cache (kept in build/triton-cache
# between the steps and between calls).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=build/gpu-check
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (allowed: --out DIR, --dry-run)"; exit 2 ;;
  esac
done
mkdir -p "$OUT" || { echo "gpu_check: cannot create the output folder '$OUT'"; exit 2; }
OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-env,build,backends,tests,kbench,bench,train$([[ $DRY == 1 ]] && echo ,compile)}
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/build/triton-cache}
export SPARSESTART_TRITON_AUTOTUNE=${AUTOTUNE:-0}
# The dry run checks the Triton kernels through the interpreter (the backends step and the
# interpreter suite, which arranges TRITON_INTERPRET itself); the benchmark and training steps
# run their GPU code paths on CPU tensors with the CPU backend (the interpreter would take
# hours there, and a forced triton backend would break the tests' own backend choices).

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, record the outcome.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local status=ok
  if [[ $rc == 124 || $rc == 137 ]]; then status="TIMEOUT"; FAILED=1
  elif [[ $rc != 0 ]]; then status="FAILED (rc $rc)"; FAILED=1; fi
  tail -n 15 "$OUT/$name.log"
  printf "%-19s %-16s %4ss  %s\n" "$name" "$status" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log" | cut -c1-100)" | tee -a "$SUMMARY"
  return $rc
}

if want env; then
  step env 60 bash -c "nvidia-smi 2>/dev/null | head -15; command -v nvcc && nvcc --version | tail -2;
    $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
import importlib.util as u
if u.find_spec(\"triton\"):
    import triton; print(\"triton\", triton.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
fi

if want build; then
  if [[ $DRY == 1 ]]; then
    # CPU build only (no nvcc needed); the CUDA sources are compiled by `make cuda-check`.
    step build 900 env SPARSESTART_CUDA=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  else
    # With the GPU visible, torch compiles for exactly this GPU's architecture.
    step build 900 env SPARSESTART_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  fi
fi

if want backends; then
  # Fail loudly when a GPU backend is missing (not rebuilt, nvcc/torch CUDA mismatch, no triton).
  step backends 120 env $([[ $DRY == 1 ]] && echo TRITON_INTERPRET=1) "$PY" - "$DRY" <<'PYEOF'
import sys
import torch
import sparsestart.ops.gpu as gpu
dry = sys.argv[1] == "1"
problems = []
if not dry:
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    if not gpu.cuda_extension_available():
        problems.append("sparsestart._C has no CUDA kernels (rebuild with SPARSESTART_CUDA=1)")
if not gpu.triton_available():
    reason = getattr(gpu, "triton_unavailable_reason", lambda: "")()
    problems.append(f"the triton backend is unavailable {reason}")
else:
    import sparsestart.kernels.launch as launch
    if launch.INTERPRETED != dry:
        problems.append(f"triton kernels are {'interpreted' if launch.INTERPRETED else 'compiled'}, expected "
                        f"{'interpreted' if dry else 'compiled'}")
print("cuda extension:", gpu.cuda_extension_available(), "| triton:", gpu.triton_available())
if problems:
    sys.exit("backends MISSING: " + "; ".join(problems))
print("backends ok")
PYEOF
fi

if want tests; then
  XDIST=()
  if [[ $DRY == 0 ]] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "${JOBS:-4}"); fi
  if [[ $DRY == 1 ]]; then
    # The interpreter suite, and the GPU test modules' CPU-side logic (they skip without CUDA);
    # then the device-generic files (modules, algorithms) run on the CPU with the reference backend
    # (their whole code path: it once found a direct-convolution output that an in-place ReLU
    # could not modify).
    step tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_triton.py tests/gpu \
      --junitxml="$OUT/tests.xml"
    step device-files-on-cpu 300 env SPARSESTART_GPU_TEST_DEVICE=cpu "$PY" -m pytest -q -p no:cacheprovider \
      tests/gpu/test_gpu_modules.py tests/gpu/test_gpu_algorithms.py --junitxml="$OUT/tests-device-files-cpu.xml"
  else
    # -rA -v: every test's outcome is in the log as it finishes (a run cut off by its limit still
    # says which tests failed; the first H200 run lost that); --timeout: a hanging test fails alone.
    step tests "${LIMIT_TESTS:-420}" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider "${XDIST[@]}" \
      --timeout "${TEST_TIMEOUT:-120}" tests/gpu tests/ops/test_triton.py tests/ops/test_dispatch_cuda.py \
      tests/ops/test_autocast.py tests/train/test_device.py --junitxml="$OUT/tests.xml" --durations=25
  fi
fi

if want kbench; then
  if [[ $DRY == 1 ]]; then
    # bench/gpu.py times CUDA kernels against cuBLAS: nothing to run on CPU but its argument parser.
    step kbench 60 "$PY" bench/gpu.py --help
  else
    step kbench "${LIMIT_KBENCH:-300}" env SPARSESTART_TRITON_AUTOTUNE=1 "$PY" bench/gpu.py --quick
  fi
fi

if want bench; then
  if [[ $DRY == 1 ]]; then
    # The GPU suites' code path at tiny shapes on CPU tensors (timings meaningless).
    step bench 300 "$PY" -m bench --gpu-dry-run --tiny --threads 1 --out-dir "$OUT" --docs "$OUT/benchmarks-dry.md"
  else
    # Quick mode: MLP and VGG-11, ERK 0.1/0.01, fp32/bf16, CSR/BSR-32, one Triton config per kernel;
    # no new case starts after BENCH_BUDGET seconds. Writes bench/results/gpu-<device>.json and docs/benchmarks.md.
    step bench "${LIMIT_BENCH:-420}" "$PY" -m bench --device cuda --quick --time-budget "${BENCH_BUDGET:-200}" --docs docs/benchmarks.md
  fi
fi

# The training runs' data (train and compile steps).
DATA=(--dataset digits)
if [[ -n "${DATA_DIR:-}" ]]; then DATA=(--dataset fashion-mnist --data-dir "$DATA_DIR"); fi

if want train; then
  if [[ $DRY == 1 ]]; then
    step train 300 "$PY" -m sparsestart.train "${DATA[@]}" --device cpu --epochs 5 \
      --test-limit 256 --out "$OUT/train-run"
  else
    step train "${LIMIT_TRAIN:-300}" "$PY" -m sparsestart.train "${DATA[@]}" --device cuda --epochs 1 --out "$OUT/train-run"
  fi
fi

if want compile; then
  COMPILED_BENCH=(--suites training --compile --train-models mlp --train-densities 0.1 --precisions bf16
                  --formats bsr32 --out-dir "$OUT" --name bench-compiled --docs '')
  if [[ $DRY == 1 ]]; then
    step compile 600 bash -c "$(printf '%q ' "$PY" -m bench --gpu-dry-run --tiny --threads 1 "${COMPILED_BENCH[@]}") &&
      $(printf '%q ' "$PY" -m sparsestart.train "${DATA[@]}" --device cpu --epochs 1 --test-limit 256 --compile \
        --no-final-eval --out "$OUT/train-compiled")"
  else
    step compile "${LIMIT_COMPILE:-420}" bash -c "$(printf '%q ' "$PY" -m bench --device cuda --quick "${COMPILED_BENCH[@]}") &&
      $(printf '%q ' "$PY" -m sparsestart.train "${DATA[@]}" --device cuda --epochs 1 --compile --out "$OUT/train-compiled")"
  fi
fi

echo
echo "== gpu_check summary ($([[ $DRY == 1 ]] && echo dry run on CPU || echo GPU)); logs in $OUT"
cat "$SUMMARY"
if [[ $FAILED == 1 ]]; then echo "gpu_check: FAILED"; exit 1; fi
echo "gpu_check: all steps passed"
