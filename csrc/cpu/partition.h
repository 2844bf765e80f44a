// Work partition of the CPU kernels.
//
// Buffers read:
//   ptr [R + 1]  compressed (block-)row pointer, non-decreasing, ptr[0] = 0
//                (int32 or int64)
// Buffers written:
//   bounds [parts + 1]  int64 row boundaries; part p owns rows
//                       [bounds[p], bounds[p + 1])
//
// Why by nonzeros: a row's cost is nnz(row) gathered input rows plus a fixed
// cost for writing its output row. Equal row counts leave one thread with most
// of the work whenever row lengths are skewed (power-law masks, ERK layers).
// The prefix sum of the cost is ptr[r] + row_cost * r, so each boundary is one
// binary search in ptr: O(parts * log R), no allocation, no pass over the rows.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sparsestart {
namespace cpu {

template <typename I>
inline void balanced_rows(const I* ptr, int64_t R, int parts, double row_cost, int64_t* bounds) {
  const double total = static_cast<double>(ptr[R]) + row_cost * static_cast<double>(R);
  bounds[0] = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = total * p / parts;
    int64_t lo = bounds[p - 1], hi = R;  // first row whose prefix cost reaches the target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<double>(ptr[mid]) + row_cost * static_cast<double>(mid) < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    bounds[p] = lo;
  }
  bounds[parts] = R;
}

// Splits [0, n) into `parts` ranges whose inner boundaries are multiples of
// `align` (so every part but the last runs whole vector tiles).
inline void aligned_split(int64_t n, int parts, int64_t align, int64_t* bounds) {
  const int64_t units = (n + align - 1) / align;
  for (int p = 0; p <= parts; ++p) bounds[p] = std::min(n, (units * p / parts) * align);
  bounds[parts] = n;
}

}  // namespace cpu
}  // namespace sparsestart
