// Argument checks shared by the CPU wrappers of _native_spmm and _native_sddmm, and the order check of
// the int64 lists the selection and structure ops take (first_out_of_order).
//
// Buffers read: only shapes and dtypes, plus ptr[0] and ptr[R] (two scalars),
// never the index contents. The kernels trust the index: ptr non-decreasing with
// ptr[R] <= C, 0 <= idx < K / b (or M / b), 0 <= slot < C; a bad entry reads (or,
// for the gradients, writes) out of bounds.
//
// The contract that makes this safe lives one level up. The public ops
// (torch.ops.sparsestart.spmm, spmm_t, sddmm, conv2d, conv2d_input_grad,
// conv2d_weight_grad; sparsestart/ops/library.py) validate the index contents in
// their real impl before calling any backend, with the check behind
// SparseMatrix.validate() (sparsestart/formats/validation.py: O(nnz), one host
// synchronisation on a GPU), and cache the verdict on rowptr keyed by the version
// counter, data pointer and identity of all six index tensors: a layer pays a
// lookup per call, and any in-place write, structure update or new tensor is
// validated again. Known hole: a write that bypasses the version counter (through
// `.data`, a NumPy view, DLPack) keeps the old verdict; after such a write the
// user must call layer.validate() (SparseMatrix.validate()). The _native_* ops are
// internal and unchecked: call them only with a validated index.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Index of the first element of v[0..n) out of order -- v[i] < v[i - 1], or with `strict` also
// v[i] == v[i - 1] -- or n when there is none: branch-free counts over fixed ranges in parallel (the
// loops vectorize), the first offending range searched afterwards. For the sorted lists RigL/SET pass
// (hundreds of thousands of keys per update) the check costs a fraction of the op that needs it.
inline int64_t first_out_of_order(const int64_t* v, int64_t n, bool strict) {
  constexpr int64_t kRange = 1 << 16;
  const int64_t ranges = (n + kRange - 1) / kRange;
  std::vector<char> bad(static_cast<size_t>(ranges), 0);
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t count = 0;  // a count, not a flag: the loop vectorizes
      const int64_t end = std::min(n, (r + 1) * kRange);
      if (strict) {
        for (int64_t i = std::max<int64_t>(1, r * kRange); i < end; ++i) count += v[i] <= v[i - 1];
      } else {
        for (int64_t i = std::max<int64_t>(1, r * kRange); i < end; ++i) count += v[i] < v[i - 1];
      }
      bad[r] = count != 0;
    }
  });
  const int64_t r = std::find(bad.begin(), bad.end(), 1) - bad.begin();
  if (r == ranges) return n;
  for (int64_t i = std::max<int64_t>(1, r * kRange);; ++i)
    if (strict ? v[i] <= v[i - 1] : v[i] < v[i - 1]) return i;
}

}  // namespace cpu
}  // namespace sparsestart
