// Argument checks shared by the CPU wrappers of _native_spmm and _native_sddmm.
//
// Buffers read: only shapes and dtypes, plus ptr[0] and ptr[R] (two scalars),
// never the index contents -- a full validation is O(nnz) and is the job of
// SparseMatrix.validate(); the kernels trust that idx < K / b and slot < C.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace sparsestart {
namespace cpu {

inline void check_index(const char* op, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot) {
  TORCH_CHECK_TYPE(ptr.scalar_type() == idx.scalar_type() && ptr.scalar_type() == slot.scalar_type(), op,
                   ": ptr, idx and slot must share one integer dtype, got ", ptr.scalar_type(), ", ",
                   idx.scalar_type(), ", ", slot.scalar_type());
  TORCH_CHECK_TYPE(ptr.scalar_type() == at::kInt || ptr.scalar_type() == at::kLong, op,
                   ": index dtype must be int32 or int64, got ", ptr.scalar_type());
  TORCH_CHECK_VALUE(ptr.dim() == 1 && ptr.numel() >= 1, op, ": ptr must be 1-D with at least one entry, got shape ",
                    ptr.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 1 && slot.dim() == 1 && idx.numel() == slot.numel(), op,
                    ": idx and slot must be 1-D of equal length, got ", idx.sizes(), " and ", slot.sizes());
}

// ptr[0] == 0 and ptr[R] <= capacity, read from the (contiguous) ptr tensor.
template <typename I>
inline void check_ptr_ends(const char* op, const I* ptr, int64_t R, int64_t capacity) {
  TORCH_CHECK_VALUE(ptr[0] == 0, op, ": ptr[0] must be 0, got ", static_cast<int64_t>(ptr[0]));
  TORCH_CHECK_VALUE(ptr[R] >= 0 && static_cast<int64_t>(ptr[R]) <= capacity, op, ": ptr[-1]=",
                    static_cast<int64_t>(ptr[R]), " live entries do not fit the capacity ", capacity);
}

// Block size of a values tensor: 1 for CSR ([C]), b for BSR ([C, b, b]).
inline int64_t block_of(const char* op, const at::Tensor& values) {
  TORCH_CHECK_VALUE(values.dim() == 1 || (values.dim() == 3 && values.size(1) == values.size(2)), op,
                    ": values must be [C] (CSR) or [C, b, b] (BSR), got ", values.sizes());
  return values.dim() == 1 ? 1 : values.size(1);
}

// How many parts to cut a kernel call into: one per thread, or a single part
// when the call is too small to pay for waking the thread pool (~5-10 us).
inline int parts_for(double flops) {
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1 || flops < 2.0e5) return 1;
  return threads;
}

}  // namespace cpu
}  // namespace sparsestart
