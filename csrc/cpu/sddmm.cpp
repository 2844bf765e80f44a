// CPU implementation of sparsestart::_native_sddmm (schema in csrc/ops.cpp).
//
// Buffers (I = int32 or int64, all three index tensors alike; T = float or
// double, a and b alike):
//   ptr    [R + 1]  compressed (block) row pointer of the CSR index
//   idx    [C]      (block) column of each position; first ptr[R] live
//   slot   [C]      slot of each position in out
//   a      [R*bs, N] dense (dY), feature-major, made contiguous here
//   b      [K, N]   dense (X), feature-major, made contiguous here
//   out    [C] (bs == 1) or [C, bs, bs]: zero-initialised, so free slots stay
//                   zero; live slots get their dot products
//   bounds [parts+1] int64 row boundaries of the parallel parts
//
// Parallel plan: one part per thread, row ranges of equal nonzero count. Each
// slot belongs to one row and so has one writer; its value is summed over N
// in tiles whose boundaries depend on N only, so the result is bitwise the
// same for any thread count. For wide N with a large b the plan cuts N into
// fixed chunks instead (see sddmm_launch):
//   scratch [nchunks - 1, C(, bs, bs)]  zeroed partial sums of chunks 1.. ,
//                                       added to out in chunk order

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "pool.h"
#include "partition.h"
#include "sddmm_kernel.h"

namespace sparsestart {
namespace cpu {
namespace {

template <typename T, typename I>
void sddmm_launch(const I* ptr, const I* idx, const I* slot, const T* a, const T* bm, T* out, int64_t R, int64_t K,
                  int64_t N, int64_t bs, int64_t capacity) {
  using Tu = SddmmTuning<T>;
  const double flops = 2.0 * static_cast<double>(ptr[R]) * bs * bs * N;
  const int parts = parts_for(flops);
  auto run = [&](T* o, int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
    if (bs == 1)
      sddmm_csr_part<T, I>(ptr, idx, slot, a, bm, o, K, N, r0, r1, n0, n1);
    else
      sddmm_bsr_part<T, I>(ptr, idx, slot, a, bm, o, N, bs, r0, r1, n0, n1);
  };
  // Chunked plan, for wide N with a bm too large to stay in L3 (unfolded
  // convolutions): a row partition would make every thread stream all of bm
  // from memory. Instead N is cut into fixed chunks of kChunkN columns, each
  // chunk's partial dot products go to its own zeroed buffer (chunk 0 straight
  // into out), and the buffers are added to out in chunk order. The chunks
  // depend on the shape only, so the result is the same for any thread count.
  const int64_t nchunks = (N + Tu::kChunkN - 1) / Tu::kChunkN;
  const int64_t elems = capacity * bs * bs;
  // Only worth it when the entries reuse bm's rows (nnz >= 2K); otherwise each
  // thread touches few rows of bm and the row partition streams them whole.
  const bool chunked = nchunks >= 2 && static_cast<double>(K) * N * sizeof(T) > 16.0 * (1 << 20) &&
                       static_cast<int64_t>(ptr[R]) * bs >= 2 * K &&
                       static_cast<double>(nchunks - 1) * elems * sizeof(T) <= 64.0 * (1 << 20);
  if (!chunked) {
    std::vector<int64_t> bounds(parts + 1);
    balanced_rows(ptr, R, parts, bs == 1 ? 1.0 : 0.25, bounds.data());
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) run(out, bounds[p], bounds[p + 1], 0, N);
    });
    return;
  }
  const at::Tensor scratch_block = pooled_scratch<T>((nchunks - 1) * elems, /*zeroed=*/true);
  T* const scratch = scratch_block.data_ptr<T>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      run(c == 0 ? out : scratch + (c - 1) * elems, 0, R, c * Tu::kChunkN, std::min(N, (c + 1) * Tu::kChunkN));
  });
  at::parallel_for(0, elems, 4096, [&](int64_t s0, int64_t s1) {
    for (int64_t c = 1; c < nchunks; ++c) {
      const T* src = scratch + (c - 1) * elems;
      for (int64_t s = s0; s < s1; ++s) out[s] += src[s];
    }
  });
}

at::Tensor native_sddmm_cpu(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot,
                            const at::Tensor& a_in, const at::Tensor& b_in, int64_t capacity, int64_t block_size) {
  constexpr const char* op = "sparsestart.sddmm";
  check_index(op, ptr, idx, slot);
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1), op,
                    ": a and b must be 2-D with equal N, got ", a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK_TYPE(a_in.scalar_type() == b_in.scalar_type(), op, ": a dtype ", a_in.scalar_type(),
                   " differs from b dtype ", b_in.scalar_type());
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(capacity == slot.numel(), op, ": capacity=", capacity, " but the index has ", slot.numel(),
                    " slots");
  const int64_t R = ptr.numel() - 1;
  TORCH_CHECK_VALUE(a_in.size(0) == R * block_size, op, ": a has ", a_in.size(0),
                    " rows but the index describes ", R * block_size);
  TORCH_CHECK_VALUE(b_in.size(0) % block_size == 0, op, ": b has ", b_in.size(0),
                    " rows, not a multiple of the block size ", block_size);
  auto a = a_in.contiguous(), bm = b_in.contiguous();
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  auto out = block_size == 1 ? pooled_zeros({capacity}, a.options())
                             : pooled_zeros({capacity, block_size, block_size}, a.options());
  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_sddmm_cpu_index", [&] {
    check_ptr_ends<index_t>(op, p.data_ptr<index_t>(), R, capacity);
    if (R == 0 || a.size(1) == 0) return;
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsestart_sddmm_cpu", [&] {
      sddmm_launch<scalar_t, index_t>(p.data_ptr<index_t>(), ix.data_ptr<index_t>(), sl.data_ptr<index_t>(),
                                      a.data_ptr<scalar_t>(), bm.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R,
                                      bm.size(0), a.size(1), block_size, capacity);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) { m.impl("_native_sddmm", &native_sddmm_cpu); }

}  // namespace cpu
}  // namespace sparsestart
