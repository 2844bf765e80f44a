// CPU implementation of sparsestart::_native_spmm (schema in csrc/ops.cpp).
//
// Buffers (I = int32 or int64, all three index tensors alike; T = float or
// double, values and x alike):
//   values [C] (CSR) or [C, b, b] (BSR)  weights addressed by slot
//   ptr    [R + 1]  compressed pointer over the R (block) rows walked
//                   (rowptr for spmm, colptr of the CSC view for spmm_t)
//   idx    [C]      (block) column of each position; first ptr[R] live
//   slot   [C]      slot of each position in values
//   x      [K, N]   dense input, feature-major, made contiguous here
//   out    [rows, N] = [R*b, N], allocated uninitialised: the kernels write
//                   every element (rows without entries get zeros)
//   bounds [parts+1] int64 row (or N) boundaries of the parallel parts
//
// Parallel plan: one part per thread. Normally parts are row ranges of equal
// nonzero count (partition.h); when N is wide (at least two register tiles
// per thread) the parts are N ranges instead, which gives each thread a
// disjoint half of x to stream and perfect balance. Either way every output
// element is computed by one thread in entry order, so the result is bitwise
// the same for any thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "checks.h"
#include "pool.h"
#include "partition.h"
#include "spmm_kernel.h"

namespace sparsestart {
namespace cpu {

int64_t k_panel_bytes() {
  // Read on every call (a getenv, against milliseconds of kernel): tests and benchmarks can set
  // the override without a new process.
  if (const char* env = std::getenv("SPARSESTART_L2_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && v > 0,
                      "SPARSESTART_L2_BYTES must be a positive whole number of bytes (the L2 cache size the CPU "
                      "kernels block for), got '", env, "'");
    return static_cast<int64_t>(v) / 2;
  }
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{1} << 20;
  }();
  return l2 / 2;
}

namespace {

template <typename T, typename I>
void spmm_launch(const T* values, const I* ptr, const I* idx, const I* slot, const T* x, T* out, int64_t R,
                 int64_t K, int64_t N, int64_t b, bool transpose, const T* bias) {
  const double flops = 2.0 * static_cast<double>(ptr[R]) * b * b * N;
  const int parts = parts_for(flops);
  const int64_t tile = b == 1 ? SpmmTuning<T>::kTile : static_cast<int64_t>(bsr_nv<T>(8)) * SpmmTuning<T>::W;
  const bool split_n = parts > 1 && (N >= 2 * SpmmTuning<T>::kTile * parts || (R < 4 * parts && N >= 2 * tile * parts));
  std::vector<int64_t> bounds(parts + 1);
  if (split_n)
    aligned_split(N, parts, tile, bounds.data());
  else
    // A row costs its entries plus writing its output row (~2 entries' worth).
    balanced_rows(ptr, R, parts, b == 1 ? 2.0 : 0.5, bounds.data());
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = split_n ? 0 : bounds[p], r1 = split_n ? R : bounds[p + 1];
      const int64_t n0 = split_n ? bounds[p] : 0, n1 = split_n ? bounds[p + 1] : N;
      if (b == 1)
        spmm_csr_part<T, I>(values, ptr, idx, slot, x, out, K, N, r0, r1, n0, n1, bias);
      else
        spmm_bsr_part<T, I>(values, ptr, idx, slot, x, out, K, N, b, transpose, r0, r1, n0, n1, bias);
    }
  });
}

// out = W x (+ bias[:, None] when `bias` is defined: every output row's sums start from its bias, so
// the bias costs no pass over the output of its own).
at::Tensor spmm_cpu(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot,
                    const at::Tensor& x_in, int64_t rows, bool transpose_blocks, const at::Tensor& bias_in) {
  constexpr const char* op = "sparsestart.spmm";
  check_index(op, ptr, idx, slot);
  const int64_t b = block_of(op, values);
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be 2-D [features, N], got ", x_in.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x_in.scalar_type(), op, ": values dtype ", values.scalar_type(),
                   " differs from x dtype ", x_in.scalar_type());
  TORCH_CHECK_VALUE(values.size(0) == slot.numel(), op, ": values has capacity ", values.size(0),
                    " but the index has ", slot.numel(), " slots");
  TORCH_CHECK_VALUE(x_in.size(0) % b == 0, op, ": x has ", x_in.size(0), " rows, not a multiple of the block size ",
                    b);
  const int64_t R = ptr.numel() - 1;
  TORCH_CHECK_VALUE(rows == R * b, op, ": rows=", rows, " but ptr describes ", R, " (block) rows of size ", b);
  auto x = x_in.contiguous();
  auto vals = values.contiguous();
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  const int64_t N = x.size(1);
  at::Tensor bias;
  if (bias_in.defined()) {
    TORCH_CHECK_VALUE(bias_in.dim() == 1 && bias_in.numel() == rows, op, ": bias must be 1-D with ", rows,
                      " entries (one per output row), got shape ", bias_in.sizes());
    TORCH_CHECK_TYPE(bias_in.scalar_type() == x_in.scalar_type(), op, ": bias dtype ", bias_in.scalar_type(),
                     " differs from x dtype ", x_in.scalar_type());
    TORCH_CHECK_VALUE(bias_in.device().is_cpu(), op, ": bias must be on the CPU, got ", bias_in.device());
    bias = bias_in.contiguous();
  }
  auto out = pooled_empty({rows, N}, x.options());
  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_spmm_cpu_index", [&] {
    check_ptr_ends<index_t>(op, p.data_ptr<index_t>(), R, ix.numel());
    if (rows == 0 || N == 0) return;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsestart_spmm_cpu", [&] {
      spmm_launch<scalar_t, index_t>(vals.data_ptr<scalar_t>(), p.data_ptr<index_t>(), ix.data_ptr<index_t>(),
                                     sl.data_ptr<index_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R,
                                     x.size(0), N, b, transpose_blocks,
                                     bias.defined() ? bias.data_ptr<scalar_t>() : nullptr);
    });
  });
  return out;
}

at::Tensor native_spmm_cpu(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                           const at::Tensor& slot, const at::Tensor& x, int64_t rows, bool transpose_blocks) {
  return spmm_cpu(values, ptr, idx, slot, x, rows, transpose_blocks, at::Tensor());
}

at::Tensor native_spmm_bias_cpu(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                                const at::Tensor& slot, const at::Tensor& x, int64_t rows, const at::Tensor& bias) {
  return spmm_cpu(values, ptr, idx, slot, x, rows, false, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) {
  m.impl("_native_spmm", &native_spmm_cpu);
  m.impl("_native_spmm_bias", &native_spmm_bias_cpu);
}

}  // namespace cpu
}  // namespace sparsestart
