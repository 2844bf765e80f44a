"""Build and install sparsestart.

The C++ extension ``sparsestart._C`` is compiled against the torch that is
already installed, so install with ``pip install --no-build-isolation``: an
isolated build environment would download a (multi-GB, CUDA) torch of its own.

Environment switches:
  SPARSESTART_PORTABLE=1   do not tune for the build host (no -march=native)
  SPARSESTART_CUDA=0/1     force the CUDA sources off/on (default: on when torch
                           has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for; default: the visible
                           GPUs, or "8.0;9.0" (A100, H100/H200) when none is visible

CUDA version rule: nvcc's CUDA major version must equal torch's (torch.version.cuda),
e.g. nvcc 13.x for a cu130 torch; a mismatch is refused here with both versions named
instead of failing later at link or load time.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


def _extension():
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("SPARSESTART_PORTABLE", "0") != "1":
        cxx.append("-march=native")
    want_cuda = os.environ.get("SPARSESTART_CUDA")
    use_cuda = (
        want_cuda == "1"
        or (want_cuda is None and torch.version.cuda is not None and shutil.which("nvcc") is not None)
    ) and bool(glob.glob("csrc/cuda/*.cu"))
    # The flags as build facts for sparsestart._C.build_info() (`sparsestart info`): a comma-joined
    # token list, since a define with quotes or spaces is not passed alike by ninja and setuptools.
    cxx += [f"-DSPARSESTART_CXX_FLAGS={','.join(cxx)}", "-DSPARSESTART_BUILD_SYSTEM=setuptools"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if use_cuda:
        _check_cuda_toolchain(torch)
        cxx.append("-DSPARSESTART_WITH_CUDA")  # csrc/ops.cpp then asks csrc/cuda/build_info.cu
        # Raw-pointer kernels (*.cu) plus the torch registration glue (csrc/cuda/torch).
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/torch/*.cpp"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        return cpp_extension.CUDAExtension("sparsestart._C", sources, **kwargs), cpp_extension.BuildExtension
    return cpp_extension.CppExtension("sparsestart._C", sources, **kwargs), cpp_extension.BuildExtension


def _check_cuda_toolchain(torch) -> None:
    """Refuse an nvcc whose CUDA major differs from torch's; default the architecture list."""
    if torch.version.cuda is None:
        raise SystemExit("setup.py: SPARSESTART_CUDA=1 but this torch has no CUDA "
                         f"(torch {torch.__version__}); install a CUDA build of torch or set SPARSESTART_CUDA=0")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"setup.py: CUDA sources requested but nvcc could not run ({err}); "
                         "put nvcc on PATH or set SPARSESTART_CUDA=0")
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        raise SystemExit(f"setup.py: nvcc is CUDA {found.group(1)}.{found.group(2)} but torch {torch.__version__} "
                         f"was built with CUDA {torch.version.cuda}: their major versions must match "
                         "(install the matching CUDA toolkit, or SPARSESTART_CUDA=0 for a CPU-only build)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for the two architectures the kernels are tuned and checked for.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


ext, build_ext = _extension()

setup(
    name="sparsestart",
    version="0.1.0",
    description="Sparse-from-the-start neural network training with real sparse storage and kernels",
    packages=find_packages(include=["sparsestart", "sparsestart.*"]) + ["sparsestart.kernels"],
    package_dir={"sparsestart.kernels": "kernels"},
    python_requires=">=3.10",
    # torch is deliberately not pinned here: a requirement would let pip replace
    # the installed CPU build by a CUDA one. The README installs torch==2.13.0.
    install_requires=["numpy", "tqdm"],
    extras_require={"test": ["pytest", "hypothesis", "expecttest", "scikit-learn"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["sparsestart=sparsestart.cli:main"]},
)
