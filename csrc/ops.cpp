// Schemas of the native kernel ops of sparsestart, in one place.
//
// The public op contract (sparsestart::spmm, spmm_t, sddmm) is defined in
// Python (sparsestart/ops/library.py) so that it exists, with the pure-PyTorch
// reference backend, even when this extension failed to build. The ops below
// are the native kernels a backend calls; each backend registers them for its
// dispatch key (csrc/cpu for CPU, csrc/cuda for CUDA).
//
// Buffers (shared by every kernel; see sparsestart/formats/compressed.py):
//   values [C] (CSR) or [C, b, b] (BSR)   weights addressed by slot
//   ptr    [R + 1]   compressed pointer over the R (block) rows being walked
//   idx    [C]       (block) column of each entry; only the first ptr[R] are live
//   slot   [C]       slot of each entry in `values`
//   x      [K, N]    dense operand, feature-major, contiguous
//   out    [rows, N] (spmm) or like `values` (sddmm)
// For spmm_t the same kernel walks the CSC view (colptr, row, slot_t) and
// `transpose_blocks` makes BSR blocks act as their transposes.
//
// ptr/idx/slot are int32 or int64 (all three alike).

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sparsestart, m) {
  // out[i, :] = sum over entries e of row i: values[slot[e]] * x[idx[e], :]
  // (BSR: out[i*b:(i+1)*b, :] += V (or V^T) @ x[idx[e]*b:(idx[e]+1)*b, :]).
  m.def(
      "_native_spmm(Tensor values, Tensor ptr, Tensor idx, Tensor slot, "
      "Tensor x, SymInt rows, bool transpose_blocks) -> Tensor");
  // _native_spmm with the row order given (CUDA only): `order` [rows] int32 is the rows by
  // decreasing length (the row swizzle), computed once per structure change by the caller
  // (sparsestart/ops/gpu.py) instead of by a sort in every call. Any permutation of the rows
  // gives the same result; the order only schedules the work.
  m.def(
      "_native_spmm_ordered(Tensor values, Tensor ptr, Tensor idx, Tensor slot, Tensor order, "
      "Tensor x, SymInt rows, bool transpose_blocks) -> Tensor");
  // out[slot[e]] = dot(a[i, :], b[idx[e], :]) for every live entry e of row i
  // (BSR: out[slot[e]] = a[i*b:(i+1)*b, :] @ b[idx[e]*b:(idx[e]+1)*b, :]^T);
  // free slots are zero.
  m.def(
      "_native_sddmm(Tensor ptr, Tensor idx, Tensor slot, Tensor a, Tensor b, "
      "SymInt capacity, int block_size) -> Tensor");
  // Direct sparse convolution, stride 1, CSR weight viewed as [Cout, Cin*KH*KW]
  // (layouts in csrc/cpu/conv.cpp): y[N, Cout, Ho, Wo] from x[N, Cin, H, W] ...
  m.def(
      "_native_conv2d(Tensor values, Tensor ptr, Tensor idx, Tensor slot, Tensor x, "
      "int[2] kernel_size, int[2] padding, int[2] dilation) -> Tensor");
  // ... dx[N, Cin, H, W] from dy, walking the CSC view (ptr=colptr, idx=row, slot=slot_t) ...
  m.def(
      "_native_conv2d_input_grad(Tensor values, Tensor ptr, Tensor idx, Tensor slot, Tensor dy, "
      "int[2] kernel_size, int[2] padding, int[2] dilation) -> Tensor");
  // ... and dV[C] (value gradient in slots, zero in free slots).
  m.def(
      "_native_conv2d_weight_grad(Tensor ptr, Tensor idx, Tensor slot, Tensor dy, Tensor x, SymInt capacity, "
      "int[2] kernel_size, int[2] padding, int[2] dilation) -> Tensor");
  // Structure update (csrc/cpu/structure.cpp): the view (ptr, idx, slot) with the entries
  // where `keep` is false removed and the new (major, minor, slot) entries (int64, sorted)
  // merged in; total = kept + new. Returns fresh (ptr, idx, slot).
  m.def(
      "_native_merge_index(Tensor ptr, Tensor idx, Tensor slot, Tensor keep, Tensor new_major, "
      "Tensor new_minor, Tensor new_slot, SymInt total) -> (Tensor, Tensor, Tensor)");
  // RigL's growth candidates (csrc/cpu/select.cpp): ascending i with |scores[i]| >= threshold
  // and base + i not in the sorted int64 `present`; and membership of sorted values in a sorted set.
  m.def("_native_absent_at_least(Tensor scores, Tensor present, int base, float threshold) -> Tensor");
  m.def("_native_sorted_isin(Tensor values, Tensor set) -> Tensor");
}

// A Python extension module with no functions: importing it runs the static
// registrations above and in csrc/cpu/*.cpp.
static struct PyModuleDef sparsestart_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "sparsestart native kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsestart_c_module); }
