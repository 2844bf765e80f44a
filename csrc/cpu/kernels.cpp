// CPU implementations of sparsestart::_native_spmm and _native_sddmm.
//
// Buffer layouts are documented in csrc/ops.cpp. In short:
//   values [C] or [C, b, b]; ptr [R + 1]; idx, slot [C] (first ptr[R] live);
//   x / a / b dense, feature-major [features, N], contiguous.
// Parallelism: OpenMP over (block) rows; every output row (spmm) or slot
// (sddmm) has exactly one writer, so results do not depend on scheduling and
// no atomics are needed.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>

namespace sparsestart {
namespace {

void check_index(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot) {
  TORCH_CHECK_TYPE(
      ptr.scalar_type() == idx.scalar_type() && ptr.scalar_type() == slot.scalar_type(),
      "sparsestart: ptr, idx and slot must share one integer dtype, got ", ptr.scalar_type(),
      ", ", idx.scalar_type(), ", ", slot.scalar_type());
  TORCH_CHECK_TYPE(
      ptr.scalar_type() == at::kInt || ptr.scalar_type() == at::kLong,
      "sparsestart: index dtype must be int32 or int64, got ", ptr.scalar_type());
  TORCH_CHECK_VALUE(ptr.dim() == 1 && ptr.numel() >= 1, "sparsestart: ptr must be 1-D with at least one entry");
  TORCH_CHECK_VALUE(idx.dim() == 1 && slot.dim() == 1 && idx.numel() == slot.numel(),
                    "sparsestart: idx and slot must be 1-D of equal length, got ", idx.sizes(), " and ",
                    slot.sizes());
}

// Block size of a values tensor: 1 for CSR ([C]), b for BSR ([C, b, b]).
int64_t block_of(const at::Tensor& values) {
  TORCH_CHECK_VALUE(values.dim() == 1 || (values.dim() == 3 && values.size(1) == values.size(2)),
                    "sparsestart: values must be [C] (CSR) or [C, b, b] (BSR), got ", values.sizes());
  return values.dim() == 1 ? 1 : values.size(1);
}

template <typename scalar_t, typename index_t>
void spmm_kernel(const scalar_t* values, const index_t* ptr, const index_t* idx, const index_t* slot,
                 const scalar_t* x, scalar_t* out, int64_t R, int64_t N, int64_t b, bool transpose_blocks) {
  const int64_t bb = b * b;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* orow = out + r * b * N;
      for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
        const scalar_t* block = values + static_cast<int64_t>(slot[e]) * bb;
        const scalar_t* xin = x + static_cast<int64_t>(idx[e]) * b * N;
        for (int64_t i = 0; i < b; ++i) {
          scalar_t* o = orow + i * N;
          for (int64_t j = 0; j < b; ++j) {
            const scalar_t v = transpose_blocks ? block[j * b + i] : block[i * b + j];
            const scalar_t* xi = xin + j * N;
            for (int64_t n = 0; n < N; ++n) o[n] += v * xi[n];
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void sddmm_kernel(const index_t* ptr, const index_t* idx, const index_t* slot, const scalar_t* a,
                  const scalar_t* bmat, scalar_t* out, int64_t R, int64_t N, int64_t b) {
  const int64_t bb = b * b;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
        scalar_t* block = out + static_cast<int64_t>(slot[e]) * bb;
        const scalar_t* bin = bmat + static_cast<int64_t>(idx[e]) * b * N;
        for (int64_t i = 0; i < b; ++i) {
          const scalar_t* ai = a + (r * b + i) * N;
          for (int64_t j = 0; j < b; ++j) {
            const scalar_t* bj = bin + j * N;
            scalar_t acc = 0;
            for (int64_t n = 0; n < N; ++n) acc += ai[n] * bj[n];
            block[i * b + j] = acc;
          }
        }
      }
    }
  });
}

at::Tensor native_spmm_cpu(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                           const at::Tensor& slot, const at::Tensor& x_in, int64_t rows,
                           bool transpose_blocks) {
  check_index(ptr, idx, slot);
  const int64_t b = block_of(values);
  TORCH_CHECK_VALUE(x_in.dim() == 2, "sparsestart.spmm: x must be 2-D [features, N], got ", x_in.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x_in.scalar_type(), "sparsestart.spmm: values dtype ",
                   values.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  const int64_t R = ptr.numel() - 1;
  TORCH_CHECK_VALUE(rows == R * b, "sparsestart.spmm: rows=", rows, " but ptr describes ", R,
                    " (block) rows of size ", b);
  auto x = x_in.contiguous();
  auto vals = values.contiguous();
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  const int64_t N = x.size(1);
  auto out = at::zeros({rows, N}, x.options());
  if (rows == 0 || N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsestart_spmm_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_spmm_cpu_index", [&] {
      spmm_kernel<scalar_t, index_t>(vals.data_ptr<scalar_t>(), p.data_ptr<index_t>(), ix.data_ptr<index_t>(),
                                     sl.data_ptr<index_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), R,
                                     N, b, transpose_blocks);
    });
  });
  return out;
}

at::Tensor native_sddmm_cpu(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot,
                            const at::Tensor& a_in, const at::Tensor& b_in, int64_t capacity,
                            int64_t block_size) {
  check_index(ptr, idx, slot);
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1),
                    "sparsestart.sddmm: a and b must be 2-D with equal N, got ", a_in.sizes(), " and ",
                    b_in.sizes());
  TORCH_CHECK_TYPE(a_in.scalar_type() == b_in.scalar_type(), "sparsestart.sddmm: a dtype ", a_in.scalar_type(),
                   " differs from b dtype ", b_in.scalar_type());
  TORCH_CHECK_VALUE(block_size >= 1, "sparsestart.sddmm: block_size must be >= 1, got ", block_size);
  const int64_t R = ptr.numel() - 1;
  TORCH_CHECK_VALUE(a_in.size(0) == R * block_size, "sparsestart.sddmm: a has ", a_in.size(0),
                    " rows but the index describes ", R * block_size);
  auto a = a_in.contiguous(), bm = b_in.contiguous();
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  auto out = block_size == 1 ? at::zeros({capacity}, a.options())
                             : at::zeros({capacity, block_size, block_size}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsestart_sddmm_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_sddmm_cpu_index", [&] {
      sddmm_kernel<scalar_t, index_t>(p.data_ptr<index_t>(), ix.data_ptr<index_t>(), sl.data_ptr<index_t>(),
                                      a.data_ptr<scalar_t>(), bm.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                      R, a.size(1), block_size);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) {
  m.impl("_native_spmm", &native_spmm_cpu);
  m.impl("_native_sddmm", &native_sddmm_cpu);
}

}  // namespace sparsestart
