// A process-wide pool for the large output buffers of the CPU ops (spmm, sddmm, conv2d and its
// gradients).
//
// Why: a training step allocates the same outputs every step (a conv layer's 16 MiB activation,
// its input gradient). Under glibc's default malloc, blocks that large are mmapped and unmapped
// (or trimmed) on free, so every step page-faults them in afresh: measured on a 3x3 64->64 layer
// at 32x32, batch 64, that tripled the sparse forward (2.5 -> 8.5 ms) while the compute stayed
// the same. The pool keeps freed blocks, keyed by their exact byte size, and hands them out
// again, already touched; nothing else in the process changes (no mallopt). Blocks smaller than
// kMinPooledBytes go through torch's allocator as before (malloc reuses them cheaply).
//
// Tensors from the pool are ordinary CPU tensors over a block with a deleter that returns the
// block to the pool (at::from_blob); their storage cannot be resized in place, which no op here
// and no autograd formula does. The pool holds at most limit bytes of free blocks (default
// 1 GiB, SPARSESTART_POOL_LIMIT_MB, sparsestart.runtime.set_output_pool_limit); beyond the
// limit, or with limit 0, freed blocks go back to the C library at once. Thread-safe.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsestart {
namespace cpu {

// Below this many bytes an output is an at::empty / at::zeros as before.
constexpr int64_t kMinPooledBytes = 256 * 1024;

// at::empty(sizes, options) for a CPU tensor, from the pool when large enough.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// at::zeros(sizes, options), likewise (a reused block is zeroed here).
at::Tensor pooled_zeros(at::IntArrayRef sizes, const at::TensorOptions& options);

// Scratch of n elements of T for the length of one call (uninitialized unless `zeroed`); the
// block returns to the pool when the returned tensor dies. Kernels take per-call scratch from
// here, not from std::vector, for the same reason as outputs: a multi-MB vector is a fresh mmap
// (page faults) on every call under glibc's default.
template <typename T>
at::Tensor pooled_scratch(int64_t n, bool zeroed = false) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return zeroed ? pooled_zeros({n}, options) : pooled_empty({n}, options);
}

struct PoolStats {
  int64_t held_bytes;   // free blocks kept for reuse
  int64_t limit_bytes;  // the most free bytes kept
  int64_t hits;         // requests served by a kept block
  int64_t misses;       // requests that allocated a new block
};
PoolStats pool_stats();
// Sets the limit; frees kept blocks beyond it (0: keep none, free every block when its tensor dies).
void pool_set_limit(int64_t bytes);

}  // namespace cpu
}  // namespace sparsestart
