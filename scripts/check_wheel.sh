#!/usr/bin/env bash
# Install sparsestart the way users do, not from the checkout: build a wheel, install it into a
# fresh venv, and use it from a directory outside the checkout (`make wheel-check`, CI).
#
#   scripts/check_wheel.sh                  # wheel built by .venv's python, checked in a fresh venv
#   PIP_INSTALL=1 scripts/check_wheel.sh    # also `pip install .` (not editable) into a second fresh venv
#   PYTHON=python3 WORK_DIR=/tmp/wc scripts/check_wheel.sh   # keep the wheel and venvs in /tmp/wc
#
# The wheel is built with --no-build-isolation against the project venv's torch: an isolated
# build would fetch a multi-GB CUDA torch. The fresh venv gets torch==2.13.0 as `make install`
# does (pip's configuration finds the CPU build on local disk), the wheel with its own
# dependencies, and triton at the project venv's version. The smoke check: the package, its
# extension and its Triton kernels import from the venv (not the checkout), `sparsestart info`
# runs, and a SparseLinear forward+backward on the native CPU backend matches dense torch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
# Outside the checkout (the smoke check must not see it); removed at the end unless WORK_DIR is given.
if [[ -n "${WORK_DIR:-}" ]]; then WORK=$WORK_DIR; else WORK=$(mktemp -d "${TMPDIR:-/tmp}/sparsestart-wheel-check.XXXXXX"); trap 'rm -rf "$WORK"' EXIT; fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
start=$SECONDS
say() { echo "check_wheel [$((SECONDS - start)) s]: $*"; }

rm -rf "$WORK/dist" "$WORK/venv" "$WORK/venv-pip" "$WORK/run"
mkdir -p "$WORK/dist" "$WORK/run"

say "building the wheel with $PY (--no-build-isolation --no-deps)"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$ROOT"
wheels=("$WORK"/dist/sparsestart-*.whl)
[[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || { echo "check_wheel: expected one wheel in $WORK/dist"; exit 1; }
WHEEL=${wheels[0]}
say "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

# Package data: everything the installed package imports must be inside the wheel.
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["sparsestart/__init__.py", "sparsestart/info.py", "sparsestart/kernels/__init__.py",
        "sparsestart/kernels/launch.py", "sparsestart/kernels/bsr.py", "sparsestart/kernels/csr.py"]
missing = [n for n in need if n not in names]
if not any(n.startswith("sparsestart/_C.") and n.endswith(".so") for n in names):
    missing.append("sparsestart/_C*.so")
if not any(n.endswith(".dist-info/entry_points.txt") for n in names):
    missing.append("*.dist-info/entry_points.txt (the `sparsestart` command)")
stray = sorted(n for n in names if n.startswith(("tests/", "bench/", "kernels/", "csrc/")))
if missing or stray:
    sys.exit(f"check_wheel: wheel lacks {missing} / holds files outside the package {stray[:5]}")
print(f"check_wheel: wheel holds {len(names)} files, the extension and sparsestart.kernels among them")
PYEOF

TRITON_SPEC=$("$PY" -c "import importlib.metadata as m; print('triton==' + m.version('triton'))" 2>/dev/null || echo triton)

# fresh_venv DIR: a venv with torch (CPU build) and triton, nothing of the checkout.
fresh_venv() {
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC"
}

# smoke VENV: use the installed package from outside the checkout.
smoke() {
  local venv=$1
  (cd "$WORK/run" && env -u PYTHONPATH "$venv/bin/python" - "$venv" "$ROOT" <<'PYEOF'
import json, os, sys
venv, checkout = (os.path.realpath(p) for p in sys.argv[1:3])
import torch
import sparsestart
from sparsestart import ops

def inside_venv(path, what):
    path = os.path.realpath(path)
    sources = [os.path.join(checkout, d) + os.sep for d in ("sparsestart", "kernels")]
    if not path.startswith(venv + os.sep) or path.startswith(tuple(sources)):
        sys.exit(f"check_wheel: {what} comes from {path}, not from the venv {venv}")
    return path

inside_venv(sparsestart.__file__, "sparsestart")
report = sparsestart.info()
ext = report["extension"]
if not ext.get("loaded") or "error" in ext:
    sys.exit(f"check_wheel: the extension does not load: {ext}")
inside_venv(ext["path"], "sparsestart._C")

# SparseLinear forward + backward on the native CPU backend, against the same weights used densely.
layer = sparsestart.nn.SparseLinear(64, 32, density=0.2, seed=0)
x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
with ops.use_backend("cpu"):
    y = layer(x)
    gx, gv = torch.autograd.grad(y.square().sum(), [x, layer.values])
yd = x @ layer.dense_weight().t() + layer.bias
gxd, gvd = torch.autograd.grad(yd.square().sum(), [x, layer.values])
for got, want in ((y, yd), (gx, gxd), (gv, gvd)):
    torch.testing.assert_close(got, want)

# The Triton kernels: the package and its launcher (which imports triton and jits the kernels).
import sparsestart.kernels.launch as launch
inside_venv(sparsestart.kernels.__file__, "sparsestart.kernels")
inside_venv(launch.__file__, "sparsestart.kernels.launch")
if not report["triton"]["kernels_import"]:
    sys.exit(f"check_wheel: sparsestart.info() says the Triton kernels do not import: {report['triton']}")
print(f"check_wheel: OK in {venv}: torch {torch.__version__}, extension {ext['simd']} "
      f"({ext['compiler']}), triton {report['triton']['version']}, backends "
      + ", ".join(n for n, b in report["backends"]["backends"].items() if b["available"]))
PYEOF
  )
  (cd "$WORK/run" && env -u PYTHONPATH "$venv/bin/sparsestart" info --json >"$WORK/run/info.json") \
    || { echo "check_wheel: \`sparsestart info --json\` failed"; exit 1; }
  "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$WORK/run/info.json"
}

say "fresh venv $WORK/venv: $TORCH_SPEC $TRITON_SPEC, then the wheel"
fresh_venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
smoke "$WORK/venv"
say "wheel OK"

if [[ "${PIP_INSTALL:-0}" == "1" ]]; then
  say "fresh venv $WORK/venv-pip: pip install --no-build-isolation . (not editable; compiles again)"
  fresh_venv "$WORK/venv-pip"
  "$WORK/venv-pip/bin/python" -m pip install -q setuptools wheel ninja
  "$WORK/venv-pip/bin/python" -m pip install -q --no-build-isolation "$ROOT"
  smoke "$WORK/venv-pip"
  say "pip install . OK"
fi
say "done"
