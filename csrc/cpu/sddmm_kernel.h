// SDDMM kernels (torch-free core of sparsestart::_native_sddmm on CPU).
//
// Buffers (row-major, contiguous; I = int32 or int64, T = float or double):
//   ptr  [R + 1]   I  entries of (block) row r are positions ptr[r]..ptr[r+1]
//   idx  [C]       I  (block) column of each position; first ptr[R] live
//   slot [C]       I  slot of each position in `out`
//   a    [R*b, N]  T  dense, feature-major (dY): a[i, n] at a[i * N + n]
//   bm   [K, N]    T  dense, feature-major (X):  bm[k, n] at bm[k * N + n]
//   panel [K, T]   T  per-part scratch, CSR with N > T only: bm[:, n0:n0+T]
//                  copied contiguously (as in spmm_kernel.h)
//   out  [C] or [C, b, b]  T  zero on entry (free slots stay zero); live slots
//                  receive their dot products (added tile by tile):
//     CSR: out[slot[e]]         = sum_n a[r, n] * bm[idx[e], n]
//     BSR: out[slot[e]][i][j]   = sum_n a[r*b+i, n] * bm[idx[e]*b+j, n]
//
// Design:
// - CSR: a tile of a[r, n0:n0+T] (up to 16 vectors) is held in registers for
//   the whole row; entries are taken 8 at a time, each with its own
//   accumulator, so one pass over the tile loads 8 gathered bm rows and runs 8
//   independent FMA chains (latency hidden, no reload of a). The 8
//   accumulators are reduced together (simd::sum8).
// - N wider than a tile: the tile loop is outside the row loop (the bm panel
//   bm[:, n0:n0+T] is reused from L2 by all rows of the part) and each tile's
//   partial dot product is added to out in tile order. The tiles depend only on
//   N, so a value's rounding does not depend on the thread count.
// - BSR: every block is a small "NT" GEMM (both operands contiguous along n):
//   register tiles of up to 4 x 4 vector accumulators, 8 loads per 16 FMAs,
//   reduced once per N tile.
// - Every slot has exactly one writer (the thread owning its row): no atomics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "panels.h"
#include "simd.h"

namespace sparsestart {
namespace cpu {

template <typename T>
struct SddmmTuning {
  using V = simd::Vec<T>;
  static constexpr int W = V::W;
#if defined(__AVX512F__)
  static constexpr int kNV = 16;  // a tile in registers: 16 zmm + 8 accumulators
  static constexpr int kE = 8;    // entries per group
#elif defined(__AVX2__)
  static constexpr int kNV = 8;  // 16 ymm: 8 for the a tile, 4 accumulators
  static constexpr int kE = 4;
#else
  static constexpr int kNV = 8;
  static constexpr int kE = 4;
#endif
  static constexpr int64_t kTile = kNV * W;
  static constexpr int64_t kBsrTile = 512;  // BSR N tile (elements): reduction amortised, panels in L2
  // N chunk of the chunked plan (see sddmm.cpp): a multiple of both tiles.
  static constexpr int64_t kChunkN = 2048;
#if defined(__AVX512F__)
  static constexpr int kNtJ = 4;  // BSR register tile 4 x 4: 16 accumulators + 8 operands of 32 zmm
#else
  static constexpr int kNtJ = 2;  // 16 ymm: 4 x 2 accumulators + 6 operands
#endif
};

template <typename T, int E>
inline void sum_group(const typename simd::Vec<T>::reg* acc, T* out) {
  if constexpr (E == 8) {
    simd::sum8<T>(acc, out);
  } else {
    for (int k = 0; k < E; ++k) out[k] = simd::Vec<T>::sum(acc[k]);
  }
}

// ---------------------------------------------------------------- CSR
//
// Entries [e0, e1) of one row against the tile of NV vectors starting at
// ar (= a + r*N + n0) and bb (= bm + n0); the last vector has `tail` lanes.
template <typename T, typename I, int NV, bool TAIL>
inline void sddmm_csr_tile(const T* ar, const I* idx, const I* slot, int64_t e0, int64_t e1, const T* bb, int64_t N,
                           T* out, int tail) {
  using V = simd::Vec<T>;
  using simd::unroll;
  constexpr int W = V::W;
  constexpr int E = SddmmTuning<T>::kE;
  auto last = [](auto v) { return TAIL && v == NV - 1; };
  typename V::reg av[NV];
  unroll<NV>([&](auto v) { av[v] = last(v) ? V::load_n(ar + v * W, tail) : V::load(ar + v * W); });
  // Masked lanes of the last vector are zero in av, but bm's must be masked
  // too: 0 * (whatever lies past the row) could be NaN.
  int64_t e = e0;
  for (; e + E <= e1; e += E) {
    const T* br[E];
    unroll<E>([&](auto k) { br[k] = bb + static_cast<int64_t>(idx[e + k]) * N; });
    if (e + 2 * E <= e1) {
      unroll<E>([&](auto k) { simd::prefetch_l2(bb + static_cast<int64_t>(idx[e + E + k]) * N); });
    }
    typename V::reg acc[E];
    unroll<E>([&](auto k) { acc[k] = V::zero(); });
    unroll<NV>([&](auto v) {
      unroll<E>([&](auto k) {
        acc[k] = V::fma(av[v], last(v) ? V::load_n(br[k] + v * W, tail) : V::load(br[k] + v * W), acc[k]);
      });
    });
    T s[E];
    sum_group<T, E>(acc, s);
    unroll<E>([&](auto k) { out[slot[e + k]] += s[k]; });
  }
  for (; e < e1; ++e) {
    const T* br = bb + static_cast<int64_t>(idx[e]) * N;
    typename V::reg acc = V::zero();
    unroll<NV>([&](auto v) { acc = V::fma(av[v], last(v) ? V::load_n(br + v * W, tail) : V::load(br + v * W), acc); });
    out[slot[e]] += V::sum(acc);
  }
}

template <typename T, typename I>
using sddmm_tile_fn = void (*)(const T*, const I*, const I*, int64_t, int64_t, const T*, int64_t, T*, int);

template <typename T, typename I, int... NVs>
struct SddmmTable {
  static sddmm_tile_fn<T, I> get(int nv, bool tail) {
    static const sddmm_tile_fn<T, I> full[] = {&sddmm_csr_tile<T, I, NVs, false>...};
    static const sddmm_tile_fn<T, I> part[] = {&sddmm_csr_tile<T, I, NVs, true>...};
    return tail ? part[nv - 1] : full[nv - 1];
  }
};
template <typename T, typename I, typename Seq>
struct SddmmTableOf;
template <typename T, typename I, int... Is>
struct SddmmTableOf<T, I, std::integer_sequence<int, Is...>> : SddmmTable<T, I, (Is + 1)...> {};

template <typename T, typename I>
inline sddmm_tile_fn<T, I> sddmm_tile_for(int nv, bool tail) {
  return SddmmTableOf<T, I, std::make_integer_sequence<int, SddmmTuning<T>::kNV>>::get(nv, tail);
}

// One part: rows [r0, r1), columns [n0, n1) (n0 a multiple of the tile); bm has K rows.
template <typename T, typename I>
void sddmm_csr_part(const I* ptr, const I* idx, const I* slot, const T* a, const T* bm, T* out, int64_t K, int64_t N,
                    int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  using Tu = SddmmTuning<T>;
  constexpr int W = Tu::W;
  if (r0 >= r1 || n0 >= n1) return;
  const int64_t nnz = ptr[r1] - ptr[r0];
  // Loop order as in spmm_csr_part: tile-outer when the part's entries reuse
  // the rows of bm (nnz >= K), else row-outer so that every gathered bm row
  // is streamed sequentially over N. Tile-outer with rows of bm longer than a
  // tile copies the panel bm[:, nb:nb+T] into a contiguous [K, T] buffer
  // (rows N*sizeof(T) apart alias in the caches when N is a large power of
  // two), if the part's entries reuse each row enough to pay for the copy.
  const bool tile_outer = nnz >= K;
  const bool pack = tile_outer && N > Tu::kTile && nnz >= 2 * K;
  std::vector<T> panel(pack ? static_cast<size_t>(K * Tu::kTile) : 0);
  auto tile_fn = [&](int64_t nb, int* tail) {
    const int64_t width = std::min<int64_t>(Tu::kTile, n1 - nb);
    const int nv = static_cast<int>((width + W - 1) / W);
    *tail = static_cast<int>(width - (nv - 1) * W);
    return sddmm_tile_for<T, I>(nv, *tail != W);
  };
  if (!tile_outer) {
    for (int64_t r = r0; r < r1; ++r) {
      if (ptr[r] == ptr[r + 1]) continue;
      for (int64_t nb = n0; nb < n1; nb += Tu::kTile) {
        int tail;
        const sddmm_tile_fn<T, I> fn = tile_fn(nb, &tail);
        fn(a + r * N + nb, idx, slot, ptr[r], ptr[r + 1], bm + nb, N, out, tail);
      }
    }
    return;
  }
  // K panels (panels.h): all rows of the part run panel by panel; an entry's sum over the tiles
  // keeps its order, so results do not change.
  const int64_t per = k_panel_rows(K, std::min<int64_t>(Tu::kTile, n1 - n0), sizeof(T), nnz, r1 - r0,
                                   kMinPanelEntries);
  const int64_t P = (K + per - 1) / std::max<int64_t>(1, per);
  const std::vector<int64_t> bounds = P > 1 ? panel_bounds(ptr, idx, r0, r1, P, per) : std::vector<int64_t>();
  for (int64_t nb = n0; nb < n1; nb += Tu::kTile) {
    int tail;
    const sddmm_tile_fn<T, I> fn = tile_fn(nb, &tail);
    const T* bs = bm + nb;
    int64_t ld = N;
    if (pack) {
      const int64_t width = std::min<int64_t>(Tu::kTile, n1 - nb);
      for (int64_t k = 0; k < K; ++k) std::copy(bm + k * N + nb, bm + k * N + nb + width, panel.data() + k * Tu::kTile);
      bs = panel.data();
      ld = Tu::kTile;
    }
    if (P > 1) {
      for (int64_t p = 0; p < P; ++p)
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t* b = bounds.data() + (r - r0) * (P + 1);
          if (b[p] < b[p + 1]) fn(a + r * N + nb, idx, slot, b[p], b[p + 1], bs, ld, out, tail);
        }
      continue;
    }
    for (int64_t r = r0; r < r1; ++r) {
      if (ptr[r] == ptr[r + 1]) continue;
      fn(a + r * N + nb, idx, slot, ptr[r], ptr[r + 1], bs, ld, out, tail);
    }
  }
}

// ---------------------------------------------------------------- BSR
//
// o[i*ldo + j] += sum_n ai[i*N + n] * bj[j*N + n] for i < RI, j < RJ, n < width.
template <typename T, int RI, int RJ>
inline void nt_tile(const T* ai, const T* bj, int64_t N, int64_t width, T* o, int64_t ldo) {
  using V = simd::Vec<T>;
  using simd::unroll;
  constexpr int W = V::W;
  typename V::reg acc[RI * RJ];
  unroll<RI * RJ>([&](auto k) { acc[k] = V::zero(); });
  // always_inline: as an out-of-line call the accumulators would go through memory.
  auto step = [&](int64_t n, int t, auto partial) __attribute__((always_inline)) {
    typename V::reg av[RI], bv[RJ];
    unroll<RI>([&](auto i) { av[i] = partial ? V::load_n(ai + i * N + n, t) : V::load(ai + i * N + n); });
    unroll<RJ>([&](auto j) { bv[j] = partial ? V::load_n(bj + j * N + n, t) : V::load(bj + j * N + n); });
    unroll<RI>([&](auto i) { unroll<RJ>([&](auto j) { acc[i * RJ + j] = V::fma(av[i], bv[j], acc[i * RJ + j]); }); });
  };
  int64_t n = 0;
  for (; n + W <= width; n += W) step(n, W, std::false_type{});
  if (n < width) step(n, static_cast<int>(width - n), std::true_type{});
  T s[RI * RJ];
  constexpr int G = (RI * RJ) / 8;
  unroll<G>([&](auto g) { simd::sum8<T>(acc + 8 * g, s + 8 * g); });
  unroll<RI * RJ - 8 * G>([&](auto k) { s[8 * G + k] = V::sum(acc[8 * G + k]); });
  unroll<RI>([&](auto i) { unroll<RJ>([&](auto j) { o[i * ldo + j] += s[i * RJ + j]; }); });
}

template <typename T, int RI>
inline void nt_row_chunk(const T* ai, const T* bblk, int64_t b, int64_t N, int64_t width, T* o) {
  int64_t j0 = 0;
  if constexpr (SddmmTuning<T>::kNtJ == 4) {
    for (; j0 + 4 <= b; j0 += 4) nt_tile<T, RI, 4>(ai, bblk + j0 * N, N, width, o + j0, b);
  } else {
    for (; j0 + 2 <= b; j0 += 2) nt_tile<T, RI, 2>(ai, bblk + j0 * N, N, width, o + j0, b);
  }
  if (j0 + 2 <= b) {
    nt_tile<T, RI, 2>(ai, bblk + j0 * N, N, width, o + j0, b);
    j0 += 2;
  }
  if (j0 < b) nt_tile<T, RI, 1>(ai, bblk + j0 * N, N, width, o + j0, b);
}

// One part: block rows [r0, r1), columns [n0, n1) (n0 a multiple of the tile).
template <typename T, typename I>
void sddmm_bsr_part(const I* ptr, const I* idx, const I* slot, const T* a, const T* bm, T* out, int64_t N, int64_t b,
                    int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  const int64_t bb = b * b;
  for (int64_t nb = n0; nb < n1; nb += SddmmTuning<T>::kBsrTile) {
    const int64_t width = std::min<int64_t>(SddmmTuning<T>::kBsrTile, n1 - nb);
    for (int64_t r = r0; r < r1; ++r) {
      const T* arow = a + r * b * N + nb;
      for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
        const T* bblk = bm + static_cast<int64_t>(idx[e]) * b * N + nb;
        T* o = out + static_cast<int64_t>(slot[e]) * bb;
        int64_t i0 = 0;
        for (; i0 + 4 <= b; i0 += 4) nt_row_chunk<T, 4>(arow + i0 * N, bblk, b, N, width, o + i0 * b);
        if (i0 + 2 <= b) {
          nt_row_chunk<T, 2>(arow + i0 * N, bblk, b, N, width, o + i0 * b);
          i0 += 2;
        }
        if (i0 < b) nt_row_chunk<T, 1>(arow + i0 * N, bblk, b, N, width, o + i0 * b);
      }
    }
  }
}

}  // namespace cpu
}  // namespace sparsestart
