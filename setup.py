"""Build and install sparsestart.

The C++ extension ``sparsestart._C`` is compiled against the torch that is
already installed, so install with ``pip install --no-build-isolation``: an
isolated build environment would download a (multi-GB, CUDA) torch of its own.

Environment switches:
  SPARSESTART_PORTABLE=1   do not tune for the build host (no -march=native)
  SPARSESTART_CUDA=0/1     force the CUDA sources off/on (default: on when torch
                           has CUDA and nvcc is found)
"""
import glob
import os
import shutil

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
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if use_cuda:
        # Raw-pointer kernels (*.cu) plus the torch registration glue (csrc/cuda/torch).
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/torch/*.cpp"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        return cpp_extension.CUDAExtension("sparsestart._C", sources, **kwargs), cpp_extension.BuildExtension
    return cpp_extension.CppExtension("sparsestart._C", sources, **kwargs), cpp_extension.BuildExtension


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
