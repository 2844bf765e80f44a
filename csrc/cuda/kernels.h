// Host API of the CUDA CSR kernels (csrc/cuda/kernels.cu): raw pointers, no torch.
//
// Buffers as in csrc/cuda/sparse_kernels.cuh (and csrc/ops.cpp):
//   values [C], ptr [R + 1], idx [C], slot [C]      (ptr/idx/slot all int32 or all int64)
//   order  [R] int32                                 spmm row swizzle: rows by decreasing length
//   x [Q, N] -> out [R, N]                           spmm, every element of out written
//   a [R, N], b [Q, N] -> dv [C]                     sddmm, dv zeroed by the caller, live slots written
// All dense operands contiguous with row stride N. Launches are asynchronous on
// `stream`; the return value is the launch error (cudaSuccess if none).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparsestart {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

struct SpmmArgs {
  DType dtype;
  IndexType index_type;
  const void* values;
  const void* ptr;
  const void* idx;
  const void* slot;
  const int32_t* order;
  const void* x;
  void* out;
  int64_t R;  // rows walked (= rows of out)
  int64_t N;
};

struct SddmmArgs {
  DType dtype;
  IndexType index_type;
  const void* ptr;
  const void* idx;
  const void* slot;
  const void* a;
  const void* b;
  void* dv;
  int64_t R;         // rows of a
  int64_t N;
  int64_t capacity;  // length of dv (the grid covers it; entries past ptr[R] are idle)
};

cudaError_t launch_csr_spmm(const SpmmArgs& args, cudaStream_t stream);
cudaError_t launch_csr_sddmm(const SddmmArgs& args, cudaStream_t stream);

// Build facts of the nvcc compilation (csrc/cuda/build_info.cu), for sparsestart._C.build_info():
// the architectures compiled for, as nvcc's __CUDA_ARCH_LIST__ gives them ("800,900"), and
// nvcc's version ("13.0.88").
const char* compiled_arch_list();
const char* nvcc_version();

}  // namespace cuda
}  // namespace sparsestart
