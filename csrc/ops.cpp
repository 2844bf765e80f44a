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

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // the at::Tensor type caster (pooled_empty)
#include <torch/headeronly/version.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/pool.h"
#include "cpu/simd.h"
#ifdef SPARSESTART_WITH_CUDA
#include "cuda/kernels.h"
#endif

TORCH_LIBRARY_FRAGMENT(sparsestart, m) {
  // out[i, :] = sum over entries e of row i: values[slot[e]] * x[idx[e], :]
  // (BSR: out[i*b:(i+1)*b, :] += V (or V^T) @ x[idx[e]*b:(idx[e]+1)*b, :]).
  m.def(
      "_native_spmm(Tensor values, Tensor ptr, Tensor idx, Tensor slot, "
      "Tensor x, SymInt rows, bool transpose_blocks) -> Tensor");
  // _native_spmm (no transposed blocks) with every output row's sums starting from bias[row] (CPU):
  // the layer's bias at no extra pass over the output.
  m.def(
      "_native_spmm_bias(Tensor values, Tensor ptr, Tensor idx, Tensor slot, "
      "Tensor x, SymInt rows, Tensor bias) -> Tensor");
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
  // (layouts in csrc/cpu/conv.cpp): y[N, Cout, Ho, Wo] from x[N, Cin, H, W], plus bias[Cout] per
  // output channel when given (added as the output is written: no second pass over y) ...
  m.def(
      "_native_conv2d(Tensor values, Tensor ptr, Tensor idx, Tensor slot, Tensor x, "
      "int[2] kernel_size, int[2] padding, int[2] dilation, Tensor? bias=None) -> Tensor");
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
  // ... and the int64 keys major * minor_extent + minor of its entries where `keep` is true (all without it).
  m.def("_native_kept_keys(Tensor ptr, Tensor idx, Tensor? keep, int minor_extent) -> Tensor");
  // RigL/SET's structure update in one op: drop the entries at CSR positions `drop`, grow the keys
  // row * Q + col in `grow` (both int64, ascending); a grown key of a dropped entry keeps that entry.
  // Returns fresh (rowptr, col, slot, colptr, row, slot_t, free_tail, freed_slots, new_slots).
  m.def(
      "_native_rewire(Tensor rowptr, Tensor col, Tensor slot, Tensor colptr, Tensor row, Tensor slot_t, "
      "Tensor drop, Tensor grow) -> Tensor[]");
  // RigL's growth candidates (csrc/cpu/select.cpp): ascending i with |scores[i]| >= threshold
  // and base + i not in the sorted int64 `present`; and membership of sorted values in a sorted set.
  m.def("_native_absent_at_least(Tensor scores, Tensor present, int base, float threshold) -> (Tensor, Tensor)");
  m.def("_native_sorted_isin(Tensor values, Tensor set) -> Tensor");
  // SET's sampling (csrc/cpu/select.cpp): the distinct values of int64 draws in [0, n), ascending;
  // and the ranks[i]-th non-negative integer absent from the sorted `present`.
  m.def("_native_sorted_distinct(Tensor values, int n) -> Tensor");
  m.def("_native_absent_at_ranks(Tensor present, Tensor ranks) -> Tensor");
  // Exact top-k of float32 scores (csrc/cpu/topk.cpp): ascending indices of the k largest (or
  // smallest) scores, ties to the smaller index, NaN above every number.
  m.def("_native_top_k(Tensor scores, int k, bool largest) -> Tensor");
}

// ------------------------------------------------------------------ build facts
// The Python module sparsestart._C: importing it runs the static registrations above
// and in csrc/cpu/*.cpp; its one function, build_info(), reports how this binary was
// built as the compiler saw it (preprocessor macros), not as the build scripts meant
// it, for `sparsestart info` (sparsestart/info.py).

// The flags setup.py / CMake passed, as a comma-separated token list
// (-DSPARSESTART_CXX_FLAGS=-O3,-fopenmp,...): no quotes or spaces, which ninja's
// shell and setuptools' argument lists would treat differently.
#define SPARSESTART_STR_(...) #__VA_ARGS__
#define SPARSESTART_STR(...) SPARSESTART_STR_(__VA_ARGS__)

// cpp_extension names the module after the last part of "sparsestart._C"; the
// CMake build (which makes no importable module) does not define it.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

namespace py = pybind11;

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef SPARSESTART_CXX_FLAGS
  info["flags"] = SPARSESTART_STR(SPARSESTART_CXX_FLAGS);
#else
  info["flags"] = py::none();
#endif
#ifdef SPARSESTART_BUILD_SYSTEM
  info["build_system"] = SPARSESTART_STR(SPARSESTART_BUILD_SYSTEM);
#else
  info["build_system"] = py::none();
#endif
#ifdef __OPTIMIZE__
  info["optimized"] = true;
#else
  info["optimized"] = false;
#endif
  info["torch_version"] = TORCH_VERSION;  // the headers built against
  info["python_version"] = PY_VERSION;

  // The CPU kernels have no runtime dispatch: csrc/cpu/simd.h picks one instruction
  // set from these macros, the same for every source file (one set of flags).
  info["simd"] = sparsestart::simd::kIsa;
  py::dict macros;
#ifdef __AVX512F__
  macros["avx512f"] = true;
#else
  macros["avx512f"] = false;
#endif
#ifdef __AVX2__
  macros["avx2"] = true;
#else
  macros["avx2"] = false;
#endif
#ifdef __FMA__
  macros["fma"] = true;
#else
  macros["fma"] = false;
#endif
  info["isa_macros"] = macros;
#if defined(__x86_64__) || defined(__i386__)
  // What the CPU running this process has: a binary built for an instruction set the CPU
  // lacks stops with SIGILL in the first kernel call.
  __builtin_cpu_init();
  py::dict cpu;
  cpu["avx512f"] = __builtin_cpu_supports("avx512f") != 0;
  cpu["avx2"] = __builtin_cpu_supports("avx2") != 0;
  cpu["fma"] = __builtin_cpu_supports("fma") != 0;
  info["cpu_supports"] = cpu;
#else
  info["cpu_supports"] = py::none();
#endif

#ifdef _OPENMP
  info["openmp"] = static_cast<long>(_OPENMP);  // yyyymm of the OpenMP specification
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = py::none();
  info["omp_max_threads"] = py::none();
#endif
  // The kernels split their work with at::parallel_for: torch's intra-op threads.
  info["intraop_threads"] = at::get_num_threads();

  py::dict cuda;
#ifdef SPARSESTART_WITH_CUDA
  cuda["compiled"] = true;
  cuda["archs"] = sparsestart::cuda::compiled_arch_list();
  cuda["nvcc"] = sparsestart::cuda::nvcc_version();
#else
  cuda["compiled"] = false;
  cuda["archs"] = py::none();
  cuda["nvcc"] = py::none();
#endif
  info["cuda"] = cuda;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsestart native kernels (registered as torch.ops.sparsestart._native_*) and their build facts";
  m.def("build_info", &build_info,
        "How this extension was built: compiler, flags, SIMD level, OpenMP, CUDA architectures (a dict).");
  m.def(
      "output_pool_stats",
      []() {
        const auto s = sparsestart::cpu::pool_stats();
        py::dict d;
        d["held_bytes"] = s.held_bytes;
        d["limit_bytes"] = s.limit_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
      },
      "The CPU ops' output-buffer pool (csrc/cpu/pool.h): free bytes kept, their limit, hits, misses.");
  m.def("set_output_pool_limit", &sparsestart::cpu::pool_set_limit, py::arg("bytes"),
        "Keep at most this many free bytes in the CPU ops' output-buffer pool (0: none).");
  m.def(
      "pooled_empty",
      [](const std::vector<int64_t>& sizes, const at::Tensor& like) {
        TORCH_CHECK_VALUE(like.device().is_cpu(), "pooled_empty: `like` must be a CPU tensor, got ", like.device());
        return sparsestart::cpu::pooled_empty(sizes, like.options());
      },
      py::arg("sizes"), py::arg("like"),
      "An uninitialised CPU tensor of `sizes` with `like`'s dtype from the output-buffer pool (for Python-side "
      "scratch that is formed again and again, e.g. RigL's dense-gradient chunks).");
}
