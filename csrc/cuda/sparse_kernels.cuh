// CUDA kernels for unstructured (CSR) SpMM and SDDMM, after Sputnik (Gale et al., SC20).
// Raw pointers and CUDA headers only: no torch, so this compiles with the CUDA
// toolkit alone (csrc/cuda/kernels.cu) and, through csrc/cuda/emu/emu.h, with a
// host C++ compiler for the CPU emulation test (tests/gpu/test_cuda_emulation.py).
//
// Buffers (csrc/ops.cpp; all dense operands feature-major and contiguous):
//   values [C]       weights addressed by slot (T)
//   ptr    [R + 1]   compressed pointer over the R rows walked (rowptr; colptr for spmm_t)   (I)
//   idx    [C]       column of each entry (CSC: row); only the first ptr[R] are live         (I)
//   slot   [C]       slot in `values` of each entry                                          (I)
//   order  [R]       spmm only: rows by decreasing length (row swizzle), int32
//   x      [Q, N]    spmm operand, row stride N                                              (T)
//   out    [R, N]    spmm output; every element is written (rows without entries get 0)     (T)
//   a [R, N], b [Q, N]  sddmm operands, row stride N                                         (T)
//   dv     [C]       sddmm output, zeroed by the caller; only live slots are written         (T)
// T is float, double, __half or __nv_bfloat16; I is int32_t or int64_t; the
// accumulator is float (double for double).
//
// Rules that keep the emulation faithful and the hardware safe: no thread
// returns early (inactive threads run empty loops), every __syncwarp/__shfl
// names exactly the lanes of one subwarp, and all of them reach it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace sparsestart {
namespace cuda {

constexpr int kBlockThreads = 128;  // 4 warps: enough blocks per SM to hide gather latency
constexpr int kWarp = 32;
constexpr int kSpmmChunk = 32;      // entries of a row staged in shared memory at a time
constexpr int kSddmmEntries = 4;    // entries one subwarp computes together (b rows in flight)

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements through the read-only path, as one 16/8/4-byte load
// when the caller guarantees alignment (the launcher picks VEC > 1 only when
// N % VEC == 0 and the base pointers are 16-byte aligned).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[VEC]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * VEC;
  if constexpr (kBytes == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(out, &u, 16);
  } else if constexpr (kBytes == 8 && VEC > 1) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(out, &u, 8);
  } else if constexpr (kBytes == 4 && VEC > 1) {
    const unsigned int u = __ldg(reinterpret_cast<const unsigned int*>(p));
    memcpy(out, &u, 4);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&in)[VEC]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * VEC;
  if constexpr (kBytes == 16) {
    uint4 u;
    memcpy(&u, in, 16);
    *reinterpret_cast<uint4*>(p) = u;
  } else if constexpr (kBytes == 8 && VEC > 1) {
    uint2 u;
    memcpy(&u, in, 8);
    *reinterpret_cast<uint2*>(p) = u;
  } else if constexpr (kBytes == 4 && VEC > 1) {
    unsigned int u;
    memcpy(&u, in, 4);
    *reinterpret_cast<unsigned int*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = in[i];
  }
}

// The lanes of the subwarp of `tid` (SW consecutive lanes of one warp).
template <int SW>
__device__ __forceinline__ unsigned subwarp_mask(int tid) {
  if constexpr (SW == kWarp) {
    return 0xffffffffu;
  } else {
    return ((1u << SW) - 1u) << ((tid % kWarp) / SW * SW);
  }
}

// --------------------------------------------------------------------- SpMM
// out[r, :] = sum_e values[slot[e]] * x[idx[e], :] over the entries e of row r.
//
// A subwarp of SW lanes owns one row (taken in swizzled order, so a block's
// and a warp's rows have similar lengths and the longest rows start first) and
// a tile of SW * VEC columns; each lane keeps VEC outputs in registers for the
// whole row. The row's (value, column) pairs are staged through shared memory
// kSpmmChunk at a time with coalesced loads (the value gather through `slot`
// happens once per entry, not once per lane), then every lane walks the chunk
// and does one vector load of x and VEC FMAs per entry. Column tiles beyond
// gridDim.y (65535) are handled by a grid-stride loop.
template <typename T, typename I, int SW, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    csr_spmm_kernel(const T* __restrict__ values, const I* __restrict__ ptr, const I* __restrict__ idx,
                    const I* __restrict__ slot, const int32_t* __restrict__ order, const T* __restrict__ x,
                    T* __restrict__ out, int64_t R, int64_t N) {
  using Acc = typename AccOf<T>::type;
  constexpr int kSubwarps = kBlockThreads / SW;
  __shared__ Acc s_val[kSubwarps][kSpmmChunk];
  __shared__ I s_col[kSubwarps][kSpmmChunk];

  const int tid = static_cast<int>(threadIdx.x);
  const int sw = tid / SW;
  const int lane = tid % SW;
  const unsigned mask = subwarp_mask<SW>(tid);
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kSubwarps + sw;
  const bool active = pos < R;
  const int64_t r = active ? static_cast<int64_t>(order[pos]) : 0;
  const int64_t start = active ? static_cast<int64_t>(ptr[r]) : 0;
  const int64_t end = active ? static_cast<int64_t>(ptr[r + 1]) : 0;
  const int64_t n_tiles = (N + SW * VEC - 1) / (SW * VEC);

  for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
    const int64_t n0 = tile * (SW * VEC) + static_cast<int64_t>(lane) * VEC;
    const bool in_range = n0 < N;  // VEC > 1 implies N % VEC == 0, so the whole vector is in range
    Acc acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = Acc(0);

    for (int64_t e0 = start; e0 < end; e0 += kSpmmChunk) {
      const int count = static_cast<int>(end - e0 < kSpmmChunk ? end - e0 : kSpmmChunk);
      for (int k = lane; k < count; k += SW) {
        s_col[sw][k] = idx[e0 + k];
        s_val[sw][k] = to_acc(values[static_cast<int64_t>(slot[e0 + k])]);
      }
      __syncwarp(mask);
      if (in_range) {
        // Four (two for 8-byte types) independent x loads in flight per lane.
        constexpr int kUnroll = sizeof(T) == 8 ? 2 : 4;
#pragma unroll kUnroll
        for (int k = 0; k < count; ++k) {
          const Acc v = s_val[sw][k];
          T xv[VEC];
          load_vec<T, VEC>(x + static_cast<int64_t>(s_col[sw][k]) * N + n0, xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += v * to_acc(xv[i]);
        }
      }
      __syncwarp(mask);  // the next chunk overwrites the staged entries
    }
    if (active && in_range) {
      T res[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) res[i] = from_acc<T>(acc[i]);
      store_vec<T, VEC>(out + r * N + n0, res);
    }
  }
}

// -------------------------------------------------------------------- SDDMM
// dv[slot[e]] = dot(a[row(e), :], b[idx[e], :]) for every live entry e.
//
// The work is split over entries, not rows: a subwarp takes kSddmmEntries
// consecutive entries (CSR order) and reduces over N, so every subwarp does
// the same amount of work whatever the row lengths (no swizzle needed) and a
// layer with few long rows still fills the GPU. The grid covers the capacity C
// (known on the host) and entries past nnz = ptr[R] are idle, so nothing waits
// for the device. The block stages its entries' columns and slots in shared
// memory (coalesced); the row of the first entry comes from a binary search in
// ptr, the following ones by stepping. Each lane accumulates its strided share
// of N with vector loads (one `a` vector reused for all entries when they share
// a row, the common case), then the subwarp reduces with shuffles.
template <typename T, typename I, int SW, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    csr_sddmm_kernel(const I* __restrict__ ptr, const I* __restrict__ idx, const I* __restrict__ slot,
                     const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ dv, int64_t R,
                     int64_t N) {
  using Acc = typename AccOf<T>::type;
  constexpr int kSubwarps = kBlockThreads / SW;
  constexpr int kE = kSddmmEntries;
  constexpr int kBlockEntries = kSubwarps * kE;
  __shared__ I s_col[kBlockEntries];
  __shared__ I s_slot[kBlockEntries];

  const int tid = static_cast<int>(threadIdx.x);
  const int sw = tid / SW;
  const int lane = tid % SW;
  const unsigned mask = subwarp_mask<SW>(tid);
  const int64_t nnz = static_cast<int64_t>(ptr[R]);
  const int64_t block_e0 = static_cast<int64_t>(blockIdx.x) * kBlockEntries;

  for (int k = tid; k < kBlockEntries; k += kBlockThreads) {
    const int64_t e = block_e0 + k;
    s_col[k] = e < nnz ? idx[e] : I(0);
    s_slot[k] = e < nnz ? slot[e] : I(0);
  }
  __syncthreads();

  const int64_t e0 = block_e0 + static_cast<int64_t>(sw) * kE;
  const int count = static_cast<int>(e0 >= nnz ? 0 : (nnz - e0 < kE ? nnz - e0 : kE));

  // Rows of the entries: binary search for e0 (ptr[lo] <= e0 < ptr[hi]), then step over empty rows.
  int64_t rows[kE];
  int64_t lo = 0, hi = R;
  if (count > 0) {
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(ptr[mid]) <= e0) lo = mid; else hi = mid;
    }
  }
  int64_t row = lo;
#pragma unroll
  for (int j = 0; j < kE; ++j) {
    if (j < count) {
      while (static_cast<int64_t>(ptr[row + 1]) <= e0 + j) ++row;
    }
    rows[j] = row;
  }
  const bool one_row = rows[0] == rows[kE - 1];

  Acc acc[kE];
#pragma unroll
  for (int j = 0; j < kE; ++j) acc[j] = Acc(0);
  const T* brow[kE];
#pragma unroll
  for (int j = 0; j < kE; ++j) brow[j] = b + static_cast<int64_t>(s_col[sw * kE + j]) * N;

  if (count > 0) {
    for (int64_t n = static_cast<int64_t>(lane) * VEC; n < N; n += SW * VEC) {
      T av[VEC];
      if (one_row) load_vec<T, VEC>(a + rows[0] * N + n, av);
#pragma unroll
      for (int j = 0; j < kE; ++j) {
        if (j < count) {
          if (!one_row) load_vec<T, VEC>(a + rows[j] * N + n, av);
          T bv[VEC];
          load_vec<T, VEC>(brow[j] + n, bv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[j] += to_acc(av[i]) * to_acc(bv[i]);
        }
      }
    }
  }
  // Butterfly reduction inside the subwarp; all its lanes take part (count is uniform in it).
#pragma unroll
  for (int j = 0; j < kE; ++j) {
#pragma unroll
    for (int offset = SW / 2; offset > 0; offset /= 2) acc[j] += __shfl_xor_sync(mask, acc[j], offset, SW);
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kE; ++j) {
      if (j < count) dv[static_cast<int64_t>(s_slot[sw * kE + j])] = from_acc<T>(acc[j]);
    }
  }
}

}  // namespace cuda
}  // namespace sparsestart
