// CUDA implementations of sparsestart::_native_spmm and _native_sddmm for CSR
// (TORCH_LIBRARY_IMPL(sparsestart, CUDA)): operand checks, the row swizzle, and
// the launch of the raw kernels of csrc/cuda/kernels.cu on the current stream.
//
// Buffers (csrc/ops.cpp): values [C] (CSR only: BSR on CUDA runs on the triton
// backend), ptr [R + 1], idx [C], slot [C] (int32 or int64 alike), x [Q, N]
// -> out [R, N]; a [R, N], b [Q, N] -> dv [C]. Temporaries: order [R] int32
// (rows by decreasing length).
//
// Needs the CUDA headers of torch (c10/cuda), so it is compiled only when
// torch has CUDA (setup.py adds csrc/cuda/torch/*.cpp with the .cu files); it
// avoids ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../kernels.h"

namespace sparsestart {
namespace {

namespace sc = ::sparsestart::cuda;

sc::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return sc::DType::kFloat32;
    case at::kDouble: return sc::DType::kFloat64;
    case at::kHalf: return sc::DType::kFloat16;
    case at::kBFloat16: return sc::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "sparsestart.", op, " (cuda): dtype must be float32, float64, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return sc::DType::kFloat32;  // unreachable
}

sc::IndexType check_index(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot, const char* op) {
  TORCH_CHECK_TYPE(ptr.scalar_type() == idx.scalar_type() && ptr.scalar_type() == slot.scalar_type(),
                   "sparsestart.", op, " (cuda): ptr, idx and slot must share one integer dtype, got ",
                   ptr.scalar_type(), ", ", idx.scalar_type(), ", ", slot.scalar_type());
  TORCH_CHECK_TYPE(ptr.scalar_type() == at::kInt || ptr.scalar_type() == at::kLong, "sparsestart.", op,
                   " (cuda): index dtype must be int32 or int64, got ", ptr.scalar_type());
  TORCH_CHECK_VALUE(ptr.dim() == 1 && ptr.numel() >= 1, "sparsestart.", op,
                    " (cuda): ptr must be 1-D with at least one entry, got shape ", ptr.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 1 && slot.dim() == 1 && idx.numel() == slot.numel(), "sparsestart.", op,
                    " (cuda): idx and slot must be 1-D of equal length, got ", idx.sizes(), " and ", slot.sizes());
  return ptr.scalar_type() == at::kInt ? sc::IndexType::kInt32 : sc::IndexType::kInt64;
}

void check_device(const at::Tensor& t, const at::Tensor& like, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == like.device(), "sparsestart.", op, " (cuda): ", name,
                    " must be on ", like.device(), ", got ", t.device());
}

// Rows by decreasing number of entries (Sputnik's row swizzle): a block's
// subwarps get rows of similar length and the longest rows are scheduled
// first. Recomputed per call (a segmented sort of R keys, a few microseconds)
// because structure updates rewrite the index in place.
at::Tensor row_swizzle(const at::Tensor& ptr) {
  const int64_t R = ptr.numel() - 1;
  auto lengths = ptr.narrow(0, 1, R) - ptr.narrow(0, 0, R);
  return std::get<1>(lengths.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).to(at::kInt);
}

// `order_in`: the row order, or an undefined tensor to compute it here (one sort per call).
at::Tensor spmm_cuda(const at::Tensor& values, const at::Tensor& ptr_in, const at::Tensor& idx_in,
                     const at::Tensor& slot_in, const at::Tensor& order_in, const at::Tensor& x_in, int64_t rows,
                     bool transpose_blocks) {
  const char* op = "spmm";
  TORCH_CHECK_VALUE(values.dim() == 1, "sparsestart.spmm (cuda): runs CSR (values [C]) only, got values of shape ",
                    values.sizes(), "; BSR on CUDA runs on the triton backend");
  const auto index_type = check_index(ptr_in, idx_in, slot_in, op);
  TORCH_CHECK_VALUE(x_in.dim() == 2, "sparsestart.spmm (cuda): x must be 2-D [features, N], got ", x_in.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x_in.scalar_type(), "sparsestart.spmm (cuda): values dtype ",
                   values.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  TORCH_CHECK_VALUE(values.numel() == slot_in.numel(), "sparsestart.spmm (cuda): values has capacity ",
                    values.numel(), " but the index has ", slot_in.numel(), " slots");
  for (const auto* t : {&ptr_in, &idx_in, &slot_in, &x_in}) check_device(*t, values, "operand", op);
  const int64_t R = ptr_in.numel() - 1;
  TORCH_CHECK_VALUE(rows == R, "sparsestart.spmm (cuda): rows=", rows, " but ptr describes ", R, " rows");
  TORCH_CHECK_VALUE(R < std::numeric_limits<int32_t>::max(), "sparsestart.spmm (cuda): too many rows (", R, ")");
  (void)transpose_blocks;  // a CSR entry is its own transpose

  const c10::cuda::CUDAGuard guard(values.device());
  auto x = x_in.contiguous(), vals = values.contiguous();
  auto ptr = ptr_in.contiguous(), idx = idx_in.contiguous(), slot = slot_in.contiguous();
  const int64_t N = x.size(1);
  auto out = at::empty({rows, N}, x.options());  // the kernel writes every element
  if (R == 0 || N == 0) return out;
  at::Tensor order;
  if (order_in.defined()) {
    // Only a permutation of [0, R) keeps every row computed once; the caller (ops/gpu.py)
    // derives it from this very ptr, so only its shape and type are checked here.
    TORCH_CHECK_VALUE(order_in.dim() == 1 && order_in.numel() == R && order_in.scalar_type() == at::kInt,
                      "sparsestart.spmm (cuda): order must be int32 [", R, "], got ", order_in.scalar_type(), " ",
                      order_in.sizes());
    check_device(order_in, values, "order", op);
    order = order_in.contiguous();
  } else {
    order = row_swizzle(ptr);
  }

  sc::SpmmArgs args{};
  args.dtype = dtype_of(x, op);
  args.index_type = index_type;
  args.values = vals.data_ptr();
  args.ptr = ptr.data_ptr();
  args.idx = idx.data_ptr();
  args.slot = slot.data_ptr();
  args.order = order.data_ptr<int32_t>();
  args.x = x.data_ptr();
  args.out = out.data_ptr();
  args.R = R;
  args.N = N;
  const cudaError_t err = sc::launch_csr_spmm(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sparsestart.spmm (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor native_spmm_cuda(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                            const at::Tensor& slot, const at::Tensor& x, int64_t rows, bool transpose_blocks) {
  return spmm_cuda(values, ptr, idx, slot, at::Tensor(), x, rows, transpose_blocks);
}

at::Tensor native_spmm_ordered_cuda(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                                    const at::Tensor& slot, const at::Tensor& order, const at::Tensor& x,
                                    int64_t rows, bool transpose_blocks) {
  return spmm_cuda(values, ptr, idx, slot, order, x, rows, transpose_blocks);
}

at::Tensor native_sddmm_cuda(const at::Tensor& ptr_in, const at::Tensor& idx_in, const at::Tensor& slot_in,
                             const at::Tensor& a_in, const at::Tensor& b_in, int64_t capacity, int64_t block_size) {
  const char* op = "sddmm";
  TORCH_CHECK_VALUE(block_size == 1, "sparsestart.sddmm (cuda): runs CSR (block_size 1) only, got block_size ",
                    block_size, "; BSR on CUDA runs on the triton backend");
  const auto index_type = check_index(ptr_in, idx_in, slot_in, op);
  TORCH_CHECK_VALUE(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(1),
                    "sparsestart.sddmm (cuda): a and b must be 2-D with equal N, got ", a_in.sizes(), " and ",
                    b_in.sizes());
  TORCH_CHECK_TYPE(a_in.scalar_type() == b_in.scalar_type(), "sparsestart.sddmm (cuda): a dtype ",
                   a_in.scalar_type(), " differs from b dtype ", b_in.scalar_type());
  TORCH_CHECK_VALUE(capacity == slot_in.numel(), "sparsestart.sddmm (cuda): capacity=", capacity,
                    " but the index has ", slot_in.numel(), " slots");
  for (const auto* t : {&ptr_in, &idx_in, &slot_in, &b_in}) check_device(*t, a_in, "operand", op);
  const int64_t R = ptr_in.numel() - 1;
  TORCH_CHECK_VALUE(a_in.size(0) == R, "sparsestart.sddmm (cuda): a has ", a_in.size(0),
                    " rows but ptr describes ", R);

  const c10::cuda::CUDAGuard guard(a_in.device());
  auto a = a_in.contiguous(), b = b_in.contiguous();
  auto ptr = ptr_in.contiguous(), idx = idx_in.contiguous(), slot = slot_in.contiguous();
  auto dv = at::zeros({capacity}, a.options());  // free slots stay zero
  const int64_t N = a.size(1);
  if (R == 0 || N == 0 || capacity == 0) return dv;

  sc::SddmmArgs args{};
  args.dtype = dtype_of(a, op);
  args.index_type = index_type;
  args.ptr = ptr.data_ptr();
  args.idx = idx.data_ptr();
  args.slot = slot.data_ptr();
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.dv = dv.data_ptr();
  args.R = R;
  args.N = N;
  args.capacity = capacity;
  const cudaError_t err = sc::launch_csr_sddmm(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sparsestart.sddmm (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CUDA, m) {
  m.impl("_native_spmm", &native_spmm_cuda);
  m.impl("_native_spmm_ordered", &native_spmm_ordered_cuda);
  m.impl("_native_sddmm", &native_sddmm_cuda);
}

}  // namespace sparsestart
