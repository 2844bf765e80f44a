// Launchers of the CUDA CSR kernels (csrc/cuda/sparse_kernels.cuh); API and
// buffer layouts in csrc/cuda/kernels.h. CUDA headers only, no torch: this file
// compiles with the CUDA toolkit alone (CMake -DSPARSESTART_CUDA=ON,
// scripts/check_ptxas.sh) and is linked into sparsestart._C by setup.py when
// torch has CUDA; the torch registration is csrc/cuda/torch/registration.cpp.

#include <cstdint>

#include "dispatch.h"
#include "kernels.h"
#include "sparse_kernels.cuh"

namespace sparsestart {
namespace cuda {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t launch_csr_spmm(const SpmmArgs& args, cudaStream_t stream) {
  if (args.R <= 0 || args.N <= 0) return cudaSuccess;
  const bool aligned = aligned16(args.x) && aligned16(args.out);
  const Shape s = spmm_shape(args.dtype, args.R, args.N, aligned);
  const bool ok = dispatch(args.dtype, args.index_type, s.subwarp, s.vec, [&](auto t, auto i, auto sw, auto vec) {
    using T = typename decltype(t)::type;
    using I = typename decltype(i)::type;
    csr_spmm_kernel<T, I, decltype(sw)::value, decltype(vec)::value>
        <<<dim3(s.grid_x, s.grid_y), dim3(kBlockThreads), 0, stream>>>(
            static_cast<const T*>(args.values), static_cast<const I*>(args.ptr), static_cast<const I*>(args.idx),
            static_cast<const I*>(args.slot), args.order, static_cast<const T*>(args.x), static_cast<T*>(args.out),
            args.R, args.N);
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_csr_sddmm(const SddmmArgs& args, cudaStream_t stream) {
  if (args.R <= 0 || args.N <= 0 || args.capacity <= 0) return cudaSuccess;
  const bool aligned = aligned16(args.a) && aligned16(args.b);
  const Shape s = sddmm_shape(args.dtype, args.capacity, args.N, aligned);
  const bool ok = dispatch(args.dtype, args.index_type, s.subwarp, s.vec, [&](auto t, auto i, auto sw, auto vec) {
    using T = typename decltype(t)::type;
    using I = typename decltype(i)::type;
    csr_sddmm_kernel<T, I, decltype(sw)::value, decltype(vec)::value>
        <<<dim3(s.grid_x), dim3(kBlockThreads), 0, stream>>>(
            static_cast<const I*>(args.ptr), static_cast<const I*>(args.idx), static_cast<const I*>(args.slot),
            static_cast<const T*>(args.a), static_cast<const T*>(args.b), static_cast<T*>(args.dv), args.R, args.N);
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparsestart
