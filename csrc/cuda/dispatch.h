// Launch shapes and the runtime -> template dispatch of the CSR kernels, shared
// by the CUDA launchers (kernels.cu) and the CPU emulation (emu/emu_test.cpp),
// so the emulation runs exactly the instantiations and grids the GPU runs.
// Host-only C++ (the type tags need the CUDA half/bfloat16 types).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels.h"
#include "sparse_kernels.cuh"

namespace sparsestart {
namespace cuda {

template <typename T> struct TypeTag { using type = T; };
template <int V> struct IntTag { static constexpr int value = V; };

struct Shape {
  int subwarp;      // lanes per row (spmm) / per entry group (sddmm)
  int vec;          // elements per vector load
  unsigned grid_x;
  unsigned grid_y;
};

inline int element_size(DType dt) {
  switch (dt) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

// 16-byte vectors when every row start is 16-byte aligned (N a multiple of the
// vector and aligned base pointers); scalar loads otherwise.
inline int vector_width(DType dt, int64_t N, bool aligned) {
  const int vec = 16 / element_size(dt);
  return aligned && N % vec == 0 ? vec : 1;
}

// The narrowest subwarp (4..32 lanes) whose lanes together cover N with one vector each,
// so short rows of a small batch do not leave most of a warp idle.
inline int subwarp_for(int64_t N, int vec) {
  const int64_t lanes = (N + vec - 1) / vec;
  return lanes <= 4 ? 4 : lanes <= 8 ? 8 : lanes <= 16 ? 16 : 32;
}

inline Shape spmm_shape(DType dt, int64_t R, int64_t N, bool aligned) {
  Shape s{};
  s.vec = vector_width(dt, N, aligned);
  s.subwarp = subwarp_for(N, s.vec);
  const int64_t rows_per_block = kBlockThreads / s.subwarp;
  const int64_t n_tiles = (N + int64_t(s.subwarp) * s.vec - 1) / (int64_t(s.subwarp) * s.vec);
  s.grid_x = static_cast<unsigned>((R + rows_per_block - 1) / rows_per_block);
  s.grid_y = static_cast<unsigned>(n_tiles < 65535 ? n_tiles : 65535);
  return s;
}

inline Shape sddmm_shape(DType dt, int64_t capacity, int64_t N, bool aligned) {
  Shape s{};
  s.vec = vector_width(dt, N, aligned);
  s.subwarp = subwarp_for(N, s.vec);
  const int64_t entries_per_block = int64_t(kBlockThreads / s.subwarp) * kSddmmEntries;
  s.grid_x = static_cast<unsigned>((capacity + entries_per_block - 1) / entries_per_block);
  s.grid_y = 1;
  return s;
}

// Calls f(TypeTag<T>, TypeTag<I>, IntTag<SW>, IntTag<VEC>) for the runtime choice; false if none matches.
template <typename T, typename I, int SW, typename F>
bool dispatch_vec(int vec, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (vec == 1) { f(TypeTag<T>{}, TypeTag<I>{}, IntTag<SW>{}, IntTag<1>{}); return true; }
  if (vec == kVec) { f(TypeTag<T>{}, TypeTag<I>{}, IntTag<SW>{}, IntTag<kVec>{}); return true; }
  return false;
}

template <typename T, typename I, typename F>
bool dispatch_sw(int sw, int vec, F&& f) {
  switch (sw) {
    case 4: return dispatch_vec<T, I, 4>(vec, f);
    case 8: return dispatch_vec<T, I, 8>(vec, f);
    case 16: return dispatch_vec<T, I, 16>(vec, f);
    case 32: return dispatch_vec<T, I, 32>(vec, f);
    default: return false;
  }
}

template <typename T, typename F>
bool dispatch_index(IndexType it, int sw, int vec, F&& f) {
  return it == IndexType::kInt32 ? dispatch_sw<T, int32_t>(sw, vec, f) : dispatch_sw<T, int64_t>(sw, vec, f);
}

template <typename F>
bool dispatch(DType dt, IndexType it, int sw, int vec, F&& f) {
  switch (dt) {
    case DType::kFloat32: return dispatch_index<float>(it, sw, vec, f);
    case DType::kFloat64: return dispatch_index<double>(it, sw, vec, f);
    case DType::kFloat16: return dispatch_index<__half>(it, sw, vec, f);
    case DType::kBFloat16: return dispatch_index<__nv_bfloat16>(it, sw, vec, f);
  }
  return false;
}

}  // namespace cuda
}  // namespace sparsestart
