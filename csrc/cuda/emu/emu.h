// A CPU emulation of the few CUDA features csrc/cuda/sparse_kernels.cuh uses,
// so the very kernel source runs without a GPU (tests/gpu/test_cuda_emulation.py).
//
// Every CUDA thread of a block is an OS thread; blocks run one after another,
// so a kernel's `__shared__` arrays become function-local statics. __syncthreads
// is a barrier over the block; __syncwarp(mask) and __shfl_xor_sync(mask, ...)
// are barriers over exactly the lanes in `mask` (a subwarp), which also checks
// the kernels' discipline: a lane that skipped a collective would deadlock the
// emulation as it would corrupt the GPU's result. __ldg is a plain load.
//
// Not emulated: timing, warp-synchronous behaviour without explicit syncs
// (none is relied on), memory-model subtleties beyond the barriers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>

#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline

namespace emu {
extern thread_local uint3 tl_thread_idx;
extern thread_local uint3 tl_block_idx;
extern dim3 g_grid_dim;
extern dim3 g_block_dim;

void syncthreads();
void syncwarp(unsigned mask);
// Exchanges `bytes` bytes among the lanes of `mask`; returns lane `src`'s value in `out`.
void exchange(unsigned mask, const void* value, int src, void* out, int bytes);
// Runs fn once per thread of each block, blocks in order (x fastest, then y), block.x threads each.
void launch(dim3 grid, dim3 block, const std::function<void()>& fn);
}  // namespace emu

#define threadIdx (::emu::tl_thread_idx)
#define blockIdx (::emu::tl_block_idx)
#define gridDim (::emu::g_grid_dim)
#define blockDim (::emu::g_block_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  const int lane = static_cast<int>(threadIdx.x) % 32;
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;  // outside the segment: CUDA returns the caller's own value
  T out;
  emu::exchange(mask, &value, src, &out, static_cast<int>(sizeof(T)));
  return out;
}
