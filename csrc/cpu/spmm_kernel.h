// SpMM kernels (torch-free core of sparsestart::_native_spmm on CPU).
//
// Buffers (row-major, contiguous; I = int32 or int64, T = float or double):
//   values [C] (CSR) or [C, b, b] (BSR)  T  weights addressed by slot; BSR
//                                         block s is values[s*b*b : (s+1)*b*b],
//                                         row-major b x b
//   ptr    [R + 1]  I  entries of (block) row r are positions ptr[r]..ptr[r+1]
//   idx    [C]      I  (block) column of each position; first ptr[R] live
//   slot   [C]      I  slot in `values` of each position
//   x      [K, N]   T  dense input, feature-major: x[k, n] at x[k * N + n]
//   out    [R*b, N] T  output, fully written (rows without entries get zeros)
//   wbuf   [kChunk] T  per-part scratch: values[slot[e]] for a chunk of
//                      positions, gathered once so the inner loop reads them
//                      sequentially (slot is a permutation for spmm_t)
//   panel  [K, T]   T  per-part scratch, only for long rows of x (N > T): the
//                      tile x[:, n0:n0+T] copied contiguously (see pack below)
//
//   CSR: out[r, n] = sum_e values[slot[e]] * x[idx[e], n],  e in row r
//   BSR: out[r*b+i, n] = sum_e sum_j V_e(i, j) * x[idx[e]*b + j, n]
//        with V_e(i, j) = block[i*b + j], or block[j*b + i] if transposed
//
// Design (measured on Zen 4, 2 cores; see bench/ and docs/benchmarks.md):
// - One output row tile of up to kNV vectors (256 floats with AVX-512) stays
//   in registers for the whole row: each entry broadcasts its weight and does
//   one FMA per vector against the gathered input row, so the only memory
//   traffic per entry is one contiguous input row segment. The kernel is bound
//   by how fast gathered rows arrive from L2/L3, not by FMA throughput.
// - For N wider than a tile, the N tile loop is outside the row loop so the
//   input panel x[:, n0:n0+T] is reused by all rows of the part, and it is
//   packed contiguously first when the part reuses its rows (rows N apart
//   alias in the caches when N is a large power of two).
// - Blocking over K as well (panels.h): when the tile's panel of x is larger
//   than half the L2 cache, all rows of a part run K panel by panel, each row
//   carrying its partial tile through `out` from one panel to the next, so the
//   gathered rows come from L2 instead of L3 (spmm 4096 x 4096 x 256 at d=0.1
//   on the Xeon of bench/results: 25 -> 10 ms). On Zen 4 an earlier version
//   lost (its L3 gathers were only ~25% slower than L2's); it was not
//   measured there again.
// - That tile-outer order needs reuse: a part with fewer entries than x has
//   rows (very sparse, or few rows against a long N) instead runs row-outer,
//   each row sweeping its whole N range, so every gathered x row is one long
//   sequential stream for the hardware prefetcher.
// - Small N (a tile of one or two vectors) is bound by the FMA latency of the
//   one accumulator chain per vector; it is correct but not tuned.
// - Each (row, n) output element is summed by one thread in the order of the
//   row's entries, so results are bitwise identical for any thread count and
//   any split of N.
// - BSR: each block is a small dense GEMM. A register tile of RB output rows x
//   NV vectors is kept over all blocks of the block row; per block column j one
//   input row segment is loaded once and used by RB broadcast-FMAs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "panels.h"
#include "simd.h"

namespace sparsestart {
namespace cpu {

template <typename T>
struct SpmmTuning {
  using V = simd::Vec<T>;
  static constexpr int W = V::W;
#if defined(__AVX512F__)
  static constexpr int kNV = 16;   // CSR row tile: 16 of 32 zmm registers
  static constexpr int kAcc = 24;  // BSR accumulator budget (RB * NV)
#elif defined(__AVX2__)
  static constexpr int kNV = 12;   // 16 ymm registers: 12 accumulators + broadcast + spare
  static constexpr int kAcc = 12;
#else
  static constexpr int kNV = 8;
  static constexpr int kAcc = 16;
#endif
  static constexpr int64_t kTile = kNV * W;  // CSR tile width in elements
  static constexpr int64_t kChunk = 4096;    // positions per gathered value chunk
  static constexpr int kPrefetch = 8;        // entries ahead for the input-row prefetch
};


// ---------------------------------------------------------------- CSR
//
// Accumulates entries [0, n) of one row (weights w[0..n), columns col[0..n))
// into the tile o[0 .. NV*W) (the last vector has `tail` valid lanes when
// TAIL), starting from `init` in every lane if `first` (0, or the row's bias:
// the bias costs no pass of its own), else from the tile's stored partial sum.
template <typename T, typename I, int NV, bool TAIL>
inline void csr_tile(const T* w, const I* col, int64_t n, const T* xb, int64_t N, T* o, int tail, bool first,
                     T init) {
  using V = simd::Vec<T>;
  using simd::unroll;
  constexpr int W = V::W;
  constexpr int PF = SpmmTuning<T>::kPrefetch;
  // The last vector is partial only when TAIL; `last` tells the unrolled bodies.
  auto last = [](auto v) { return TAIL && v == NV - 1; };
  typename V::reg acc[NV];
  if (first) {
    const typename V::reg start = V::set1(init);
    unroll<NV>([&](auto v) { acc[v] = start; });
  } else {
    unroll<NV>([&](auto v) { acc[v] = last(v) ? V::load_n(o + v * W, tail) : V::load(o + v * W); });
  }
  for (int64_t e = 0; e < n; ++e) {
    const T* xr = xb + static_cast<int64_t>(col[e]) * N;
    // The hardware prefetcher cannot predict the gather: fetch the row PF
    // entries ahead into L2, every other line (the adjacent-line prefetcher
    // brings the neighbour). On Zen 4 this measured within noise (+-5%) for
    // 128- and 256-float tiles -- out-of-order execution already overlaps
    // the row loads -- and it is kept for cores with smaller windows.
    const T* xp = xb + static_cast<int64_t>(col[e + PF < n ? e + PF : n - 1]) * N;
    unroll<(NV + 1) / 2>([&](auto h) { simd::prefetch_l2(xp + 2 * h * W); });
    const typename V::reg wv = V::set1(w[e]);
    unroll<NV>([&](auto v) {
      acc[v] = V::fma(wv, last(v) ? V::load_n(xr + v * W, tail) : V::load(xr + v * W), acc[v]);
    });
  }
  unroll<NV>([&](auto v) {
    if (last(v))
      V::store_n(o + v * W, acc[v], tail);
    else
      V::store(o + v * W, acc[v]);
  });
}

template <typename T, typename I>
using csr_tile_fn = void (*)(const T*, const I*, int64_t, const T*, int64_t, T*, int, bool, T);

// Table of csr_tile instantiations indexed by [NV - 1][TAIL].
template <typename T, typename I, int... NVs>
struct CsrTable {
  static csr_tile_fn<T, I> get(int nv, bool tail) {
    static const csr_tile_fn<T, I> full[] = {&csr_tile<T, I, NVs, false>...};
    static const csr_tile_fn<T, I> part[] = {&csr_tile<T, I, NVs, true>...};
    return tail ? part[nv - 1] : full[nv - 1];
  }
};

template <typename T, typename I, typename Seq>
struct CsrTableOf;
template <typename T, typename I, int... Is>
struct CsrTableOf<T, I, std::integer_sequence<int, Is...>> : CsrTable<T, I, (Is + 1)...> {};

template <typename T, typename I>
inline csr_tile_fn<T, I> csr_tile_for(int nv, bool tail) {
  return CsrTableOf<T, I, std::make_integer_sequence<int, SpmmTuning<T>::kNV>>::get(nv, tail);
}

// Calls body(c0, c1, ra, rb) for the part's positions [pbeg, pend) cut into
// chunks [c0, c1) of at most `chunk` positions; rows [ra, rb) are those with
// entries in the chunk, plus empty rows (each exactly once). A row longer than
// a chunk appears in several consecutive chunks.
template <typename I, typename F>
inline void for_chunks(const I* ptr, int64_t r0, int64_t r1, int64_t chunk, F&& body) {
  const int64_t pbeg = ptr[r0], pend = ptr[r1];
  int64_t rfirst = r0;  // first row not finished by an earlier chunk
  for (int64_t c0 = pbeg;; c0 += chunk) {
    const int64_t c1 = std::min(pend, c0 + chunk);
    // Rows from rfirst that start before c1; empty rows sitting at c1 belong
    // to the next chunk unless this is the last.
    const bool last = c1 == pend;
    int64_t rend = rfirst;
    while (rend < r1 && (ptr[rend] < c1 || (last && ptr[rend] == c1))) ++rend;
    body(c0, c1, rfirst, rend);
    rfirst = (rend > rfirst && ptr[rend] > c1) ? rend - 1 : rend;  // the last row may continue
    if (last) break;
  }
}

// One part: rows [r0, r1), columns [n0, n1) of out; x has K rows. `bias` (null: none) holds one
// value per output row, the sums' starting value.
template <typename T, typename I>
void spmm_csr_part(const T* values, const I* ptr, const I* idx, const I* slot, const T* x, T* out, int64_t K,
                   int64_t N, int64_t r0, int64_t r1, int64_t n0, int64_t n1, const T* bias) {
  using Tu = SpmmTuning<T>;
  constexpr int W = Tu::W;
  if (r0 >= r1 || n0 >= n1) return;
  const int64_t pbeg = ptr[r0], pend = ptr[r1], nnz = pend - pbeg;
  // Loop order. Tile-outer (every row of the part for one N tile, then the
  // next tile) reuses the panel x[:, tile] across rows; it pays when the part
  // has at least as many entries as x has rows. With fewer (very sparse, or a
  // few rows against long N) nothing is reused, and row-outer order (each row
  // sweeps its whole N range) makes every gathered x row one long sequential
  // stream the hardware prefetcher follows (measured 2-3x on 64 x 576 x 65536
  // at density 0.01 and 0.001).
  const bool tile_outer = nnz >= K;
  // Tile-outer, pack the panel x[:, nb:nb+T] into a contiguous [K, T] buffer
  // when rows of x are longer than a tile and the part reuses each row enough
  // to pay for the copy. Why: with N a large power of two, the tile segments
  // of consecutive x rows sit N*sizeof(T) apart and all map to the same few
  // cache sets, so the panel cannot stay in L1/L2 (measured 3x slower on
  // 256 x 2304 x 4096 without packing).
  const bool pack = tile_outer && N > Tu::kTile && nnz >= 2 * K;
  std::vector<T> panel(pack ? static_cast<size_t>(K * Tu::kTile) : 0);
  // K panels (tile-outer only): `per` rows of x per panel, P panels. All rows of the part run
  // panel by panel (the values of the whole part gathered once, not by chunks: a chunk covers only
  // a few rows, and the panel must serve every row of the part before the next one is read). A
  // row's entries are still summed in entry order (its panels in column order), so the blocking
  // does not change a bit of the result.
  const int64_t per = tile_outer ? k_panel_rows(K, std::min<int64_t>(Tu::kTile, n1 - n0), sizeof(T), nnz, r1 - r0,
                                                kMinPanelEntries)
                                 : K;
  const int64_t P = (K + per - 1) / std::max<int64_t>(1, per);
  // Values of a chunk of positions, gathered once per chunk (once per call
  // when the part fits one chunk) so the inner loop reads them sequentially.
  std::vector<T> wbuf(static_cast<size_t>(std::min<int64_t>(Tu::kChunk, std::max<int64_t>(1, nnz))));
  const bool one_chunk = nnz <= Tu::kChunk;
  // values[slot[e]] for e in [c0, c1) into dst[0 ..).
  auto gather_into = [&](int64_t c0, int64_t c1, T* dst) {
    // For spmm_t slot is a random permutation: prefetch ahead to have more
    // loads in flight than the out-of-order window finds (~5% on spmm_t).
    constexpr int64_t kAhead = 32;
    for (int64_t e = c0; e < c1; ++e) {
      if (e + kAhead < c1) simd::prefetch(values + slot[e + kAhead]);
      dst[e - c0] = values[slot[e]];
    }
  };
  auto gather = [&](int64_t c0, int64_t c1) { gather_into(c0, c1, wbuf.data()); };
  if (one_chunk && P == 1) gather(pbeg, pend);

  struct Tile {
    int64_t nb;
    int tail;
    csr_tile_fn<T, I> fn;
  };
  auto tile_at = [&](int64_t nb) {
    const int64_t tw = std::min<int64_t>(Tu::kTile, n1 - nb);
    const int nv = static_cast<int>((tw + W - 1) / W);
    const int tail = static_cast<int>(tw - (nv - 1) * W);
    return Tile{nb, tail, csr_tile_for<T, I>(nv, tail != W)};
  };
  // Row r's entries of chunk [c0, c1) into one tile. A row split over chunks
  // carries its partial sums through `out` in entry order, so the result
  // equals the unsplit sum bit for bit.
  auto run = [&](const Tile& t, const T* xs, int64_t ld, int64_t r, int64_t c0, int64_t c1) {
    const int64_t e0 = std::max<int64_t>(ptr[r], c0), e1 = std::min<int64_t>(ptr[r + 1], c1);
    t.fn(wbuf.data() + (e0 - c0), idx + e0, e1 - e0, xs, ld, out + r * N + t.nb, t.tail, ptr[r] >= c0,
         bias ? bias[r] : T(0));
  };
  auto run_panels = [&](const Tile& t, const T* xs, int64_t ld, const T* w, const std::vector<int64_t>& bounds) {
    for (int64_t p = 0; p < P; ++p)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t* b = bounds.data() + (r - r0) * (P + 1);
        if (b[p] == b[p + 1] && !(p == 0 && ptr[r] == ptr[r + 1])) continue;
        // The row's first panel with entries starts the tile (an empty row: zeros in panel 0).
        const bool first = b[p] == ptr[r];
        t.fn(w + (b[p] - pbeg), idx + b[p], b[p + 1] - b[p], xs, ld, out + r * N + t.nb, t.tail, first,
             bias ? bias[r] : T(0));
      }
  };

  // The tile-outer loop: for each N tile, the panel of x it reads (packed if `pack`), then `body`.
  auto for_tiles = [&](auto&& body) {
    for (int64_t nb = n0; nb < n1; nb += Tu::kTile) {
      const T* xs = x + nb;
      int64_t ld = N;
      if (pack) {
        const int64_t tw = std::min<int64_t>(Tu::kTile, n1 - nb);
        for (int64_t k = 0; k < K; ++k) std::copy(x + k * N + nb, x + k * N + nb + tw, panel.data() + k * Tu::kTile);
        xs = panel.data();
        ld = Tu::kTile;
      }
      body(tile_at(nb), xs, ld);
    }
  };
  if (P > 1) {
    const std::vector<int64_t> bounds = panel_bounds(ptr, idx, r0, r1, P, per);
    std::vector<T> wall(static_cast<size_t>(nnz));
    gather_into(pbeg, pend, wall.data());
    for_tiles([&](const Tile& t, const T* xs, int64_t ld) { run_panels(t, xs, ld, wall.data(), bounds); });
  } else if (tile_outer) {
    for_tiles([&](const Tile& t, const T* xs, int64_t ld) {
      for_chunks(ptr, r0, r1, Tu::kChunk, [&](int64_t c0, int64_t c1, int64_t ra, int64_t rb) {
        if (!one_chunk) gather(c0, c1);
        for (int64_t r = ra; r < rb; ++r) run(t, xs, ld, r, c0, c1);
      });
    });
  } else {
    for_chunks(ptr, r0, r1, Tu::kChunk, [&](int64_t c0, int64_t c1, int64_t ra, int64_t rb) {
      if (!one_chunk) gather(c0, c1);
      for (int64_t r = ra; r < rb; ++r)
        for (int64_t nb = n0; nb < n1; nb += Tu::kTile) run(tile_at(nb), x + nb, N, r, c0, c1);
    });
  }
}

// ---------------------------------------------------------------- BSR
//
// Rows i0 .. i0+RB of block row r, tile of NV vectors (the last one has
// `tail` lanes). V(i, j) = blk[i * rs + j * cs] with (rs, cs) = (b, 1), or
// (1, b) for transposed blocks.
template <typename T, typename I, int RB, int NV>
inline void bsr_tile(const T* values, const I* idx, const I* slot, int64_t e0, int64_t e1, int64_t b, int64_t rs,
                     int64_t cs, int64_t i0, const T* xb, int64_t ldx, T* o, int64_t ldo, int tail, const T* bias) {
  using V = simd::Vec<T>;
  using simd::unroll;
  constexpr int W = V::W;
  const int64_t bb = b * b;
  typename V::reg acc[RB * NV];
  // Row i0 + i starts from its bias (`bias` points at the block row's first row; null: zero).
  unroll<RB>([&](auto i) {
    const typename V::reg start = bias ? V::set1(bias[i0 + i]) : V::zero();
    unroll<NV>([&](auto v) { acc[i * NV + v] = start; });
  });
  for (int64_t e = e0; e < e1; ++e) {
    const T* blk = values + static_cast<int64_t>(slot[e]) * bb + i0 * rs;
    const T* xr = xb + static_cast<int64_t>(idx[e]) * b * ldx;
    if (e + 1 < e1) simd::prefetch(values + static_cast<int64_t>(slot[e + 1]) * bb + i0 * rs);
    for (int64_t j = 0; j < b; ++j) {
      const T* xj = xr + j * ldx;
      typename V::reg xv[NV];
      unroll<NV>([&](auto v) { xv[v] = v == NV - 1 ? V::load_n(xj + v * W, tail) : V::load(xj + v * W); });
      const T* wj = blk + j * cs;
      unroll<RB>([&](auto i) {
        const typename V::reg wv = V::set1(wj[i * rs]);
        unroll<NV>([&](auto v) { acc[i * NV + v] = V::fma(wv, xv[v], acc[i * NV + v]); });
      });
    }
  }
  unroll<RB>([&](auto i) {
    T* oi = o + (i0 + i) * ldo;
    unroll<NV>([&](auto v) {
      if (v == NV - 1)
        V::store_n(oi + v * W, acc[i * NV + v], tail);
      else
        V::store(oi + v * W, acc[i * NV + v]);
    });
  });
}

template <typename T, typename I>
using bsr_tile_fn = void (*)(const T*, const I*, const I*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             const T*, int64_t, T*, int64_t, int, const T*);

template <typename T, typename I, int RB, int... NVs>
struct BsrTable {
  static bsr_tile_fn<T, I> get(int nv) {
    static const bsr_tile_fn<T, I> fns[] = {&bsr_tile<T, I, RB, NVs>...};
    return fns[nv - 1];
  }
};
template <typename T, typename I, int RB, typename Seq>
struct BsrTableOf;
template <typename T, typename I, int RB, int... Is>
struct BsrTableOf<T, I, RB, std::integer_sequence<int, Is...>> : BsrTable<T, I, RB, (Is + 1)...> {};

// Vectors per tile for a register tile of RB rows.
template <typename T>
constexpr int bsr_nv(int rb) {
  return std::max(1, std::min(SpmmTuning<T>::kNV, SpmmTuning<T>::kAcc / rb));
}

template <typename T, typename I>
inline bsr_tile_fn<T, I> bsr_tile_for(int rb, int nv) {
  switch (rb) {
    case 8:
      return BsrTableOf<T, I, 8, std::make_integer_sequence<int, bsr_nv<T>(8)>>::get(nv);
    case 4:
      return BsrTableOf<T, I, 4, std::make_integer_sequence<int, bsr_nv<T>(4)>>::get(nv);
    case 2:
      return BsrTableOf<T, I, 2, std::make_integer_sequence<int, bsr_nv<T>(2)>>::get(nv);
    default:
      return BsrTableOf<T, I, 1, std::make_integer_sequence<int, bsr_nv<T>(1)>>::get(nv);
  }
}

// One part: block rows [r0, r1), columns [n0, n1) of out; x has K rows; `bias` as in spmm_csr_part.
template <typename T, typename I>
void spmm_bsr_part(const T* values, const I* ptr, const I* idx, const I* slot, const T* x, T* out, int64_t K,
                   int64_t N, int64_t b, bool transpose, int64_t r0, int64_t r1, int64_t n0, int64_t n1,
                   const T* bias) {
  constexpr int W = SpmmTuning<T>::W;
  // One tile width for every row chunk: that of the 8-row register tile.
  constexpr int64_t kTileB = static_cast<int64_t>(bsr_nv<T>(8)) * W;
  if (r0 >= r1 || n0 >= n1) return;
  const int64_t rs = transpose ? 1 : b, cs = transpose ? b : 1;
  const int64_t nnz = ptr[r1] - ptr[r0], Q = K / b;
  // Loop order and packing as in spmm_csr_part, counted in block rows of x.
  const bool tile_outer = nnz >= Q;
  const bool pack = tile_outer && N > kTileB && nnz >= 2 * Q;
  std::vector<T> panel(pack ? static_cast<size_t>(K * kTileB) : 0);
  // All rows chunks (8, then 4, 2, 1 rows: any b) of block row r, one tile.
  auto run = [&](int64_t r, int64_t nb, const T* xs, int64_t ld) {
    const int64_t tw = std::min(kTileB, n1 - nb);
    const int nv = static_cast<int>((tw + W - 1) / W);
    const int tail = static_cast<int>(tw - (nv - 1) * W);
    for (int64_t i0 = 0; i0 < b;) {
      const int rb = b - i0 >= 8 ? 8 : b - i0 >= 4 ? 4 : b - i0 >= 2 ? 2 : 1;
      bsr_tile_for<T, I>(rb, nv)(values, idx, slot, ptr[r], ptr[r + 1], b, rs, cs, i0, xs, ld, out + r * b * N + nb, N,
                                 tail, bias ? bias + r * b : nullptr);
      i0 += rb;
    }
  };
  if (!tile_outer) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t nb = n0; nb < n1; nb += kTileB) run(r, nb, x + nb, N);
    return;
  }
  for (int64_t nb = n0; nb < n1; nb += kTileB) {
    const T* xs = x + nb;
    int64_t ld = N;
    if (pack) {
      const int64_t tw = std::min(kTileB, n1 - nb);
      for (int64_t k = 0; k < K; ++k) std::copy(x + k * N + nb, x + k * N + nb + tw, panel.data() + k * kTileB);
      xs = panel.data();
      ld = kTileB;
    }
    for (int64_t r = r0; r < r1; ++r) run(r, nb, xs, ld);
  }
}

}  // namespace cpu
}  // namespace sparsestart
