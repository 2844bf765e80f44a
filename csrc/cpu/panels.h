// K-panel blocking of the CSR SpMM and SDDMM kernels (spmm_kernel.h, sddmm_kernel.h).
//
// Both gather one row of the dense operand x [K, N] per stored entry (a tile of up to 256
// floats of it). When x's tile panel x[:, tile] is larger than the L2 cache, every gathered row
// comes from L3 or memory; on the Intel Xeon of bench/results (2 MB L2 per core, a large mesh
// L3) that made spmm 4096 x 4096 x 256 at density 0.1 L3-bandwidth bound (25 ms). Cutting K into
// panels that fit half of L2 and running all rows of a part panel by panel keeps the gathered
// rows in L2 (10 ms; spmm_t 33 -> 11 ms, sddmm likewise, measured in one process with the
// blocking switched off by SPARSESTART_L2_BYTES). A row's entries are sorted by column, so its
// entries of one panel are a contiguous range (panel_bounds); processing them panel by panel
// keeps each row's (spmm) or entry's (sddmm) summation order, so results are bitwise the same
// with or without blocking.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsestart {
namespace cpu {

// K blocking only where each row has at least this many entries per panel on average.
constexpr int64_t kMinPanelEntries = 8;

// Bytes of x one K panel of the CSR kernels may hold: half the L2 cache of the core (the rest
// for the output tiles, the entry lists and the other hyperthread), SPARSESTART_L2_BYTES
// overriding what the C library reports (1 MiB when it reports nothing); a value that is not a
// positive whole number raises ValueError naming it.
int64_t k_panel_bytes();

// Rows of x per K panel for a tile of `tile` elements of `elem` bytes, or K (one panel: no
// blocking) when x's tile panel fits or the part has fewer than `min_entries` entries per row
// and panel on average (then the per-panel work of a row outweighs what L2 saves).
inline int64_t k_panel_rows(int64_t K, int64_t tile, int64_t elem, int64_t nnz, int64_t rows,
                            int64_t min_entries) {
  const int64_t per = std::max<int64_t>(1, k_panel_bytes() / std::max<int64_t>(1, tile * elem));
  if (per >= K) return K;
  const int64_t panels = (K + per - 1) / per;
  if (nnz < min_entries * panels * std::max<int64_t>(1, rows)) return K;
  return per;
}

// bounds[(r - r0) * (P + 1) + p] = first entry of row r with column >= p * per (columns of a row
// are increasing), for P panels of `per` columns; bounds[... + P] = ptr[r + 1].
template <typename I>
inline std::vector<int64_t> panel_bounds(const I* ptr, const I* idx, int64_t r0, int64_t r1, int64_t P, int64_t per) {
  std::vector<int64_t> bounds(static_cast<size_t>((r1 - r0) * (P + 1)));
  for (int64_t r = r0; r < r1; ++r) {
    int64_t* b = bounds.data() + (r - r0) * (P + 1);
    b[0] = ptr[r];
    for (int64_t p = 1; p < P; ++p)
      b[p] = std::lower_bound(idx + b[p - 1], idx + ptr[r + 1], static_cast<I>(p * per)) - idx;
    b[P] = ptr[r + 1];
  }
  return bounds;
}

}  // namespace cpu
}  // namespace sparsestart
