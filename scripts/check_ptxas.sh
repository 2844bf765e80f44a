#!/usr/bin/env bash
# CI check of the CUDA C++ kernels without a GPU: compile csrc/cuda/*.cu with
# nvcc through CMake (-DSPARSESTART_CUDA=ON: sm_80 and sm_90, -Xptxas=-v) and
# fail if ptxas reports any register spill, or if no kernel was compiled.
# Prints registers / shared memory / spills per kernel and architecture.
#
#   scripts/check_ptxas.sh            # uses .venv/bin/python for torch's CMake config
#   PYTHON=python3 BUILD_DIR=/tmp/b scripts/check_ptxas.sh
#   FULL=1 scripts/check_ptxas.sh     # also build the whole extension library (CPU sources too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
BUILD=${BUILD_DIR:-build/cuda}
mkdir -p "$BUILD"
LOG=$BUILD/ptxas.log

command -v nvcc >/dev/null || { echo "check_ptxas: nvcc not found (install the CUDA toolkit)"; exit 1; }
cmake -S . -B "$BUILD" -DSPARSESTART_CUDA=ON -DPython3_EXECUTABLE="$PY" >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; exit 1; }
# --clean-first: an up-to-date build would print no ptxas report and pass vacuously.
if ! cmake --build "$BUILD" --target sparsestart_cuda_kernels --clean-first -j "${JOBS:-2}" >"$LOG" 2>&1; then
  grep -v "^ptxas info" "$LOG" | tail -50
  echo "check_ptxas: nvcc compilation FAILED"
  exit 1
fi
if [[ "${FULL:-0}" == "1" ]]; then
  cmake --build "$BUILD" -j "${JOBS:-2}"
fi

"$PY" - "$LOG" <<'PYEOF'
import re, shutil, subprocess, sys
log = open(sys.argv[1]).read()
pat = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'\n.*?Function properties for \S+\n"
                 r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                 r"ptxas info\s+: Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?", re.S)
rows = [m.groups() for m in pat.finditer(log)]
entries = log.count("Compiling entry function")
if not rows or len(rows) != entries:
    print(f"check_ptxas: parsed {len(rows)} of {entries} kernel reports; the ptxas output format changed?")
    sys.exit(1)
names = [r[0] for r in rows]
if shutil.which("c++filt"):
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
bad = 0
print(f"{'arch':<6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
for (mangled, arch, stack, st, ld, regs, smem), name in zip(rows, names):
    short = re.sub(r"sparsestart::cuda::|__nv_bfloat16|\(.*\)$", lambda m: "bf16" if m.group(0) == "__nv_bfloat16" else "", name)
    flag = "  <-- SPILL" if int(st) or int(ld) else ""
    bad += bool(flag)
    print(f"{arch:<6} {regs:>4} {smem or 0:>6} {stack:>5} {st:>8} {ld:>8}  {short}{flag}")
regs = [int(r[5]) for r in rows]
print(f"\n{len(rows)} kernels; registers {min(regs)}..{max(regs)}; {bad} with spills")
sys.exit(1 if bad else 0)
PYEOF
echo "check_ptxas: OK (no spills)"
