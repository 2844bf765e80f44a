// Candidate selection for RigL's growth on CPU: one pass over a dense gradient chunk.
//
//   _native_absent_at_least(scores [n] float32/float64, present [p] int64 sorted, base int, threshold float)
//     -> (ascending int64 i in [0, n) with |scores[i]| >= threshold and base + i not in `present`,
//         |scores[i]| at those i)
//   _native_sorted_isin(values [k] int64 sorted, set [m] int64 sorted) -> bool [k]
//   _native_sorted_distinct(values [m] int64 in [0, n), n) -> the distinct values, ascending
//   _native_absent_at_ranks(present [p] int64 sorted distinct, ranks [k] int64 sorted)
//     -> [k] int64: the ranks[i]-th smallest non-negative integer not in `present`
//
// Why native: RigL forms the dense gradient of a layer (16.7M entries for 4096 x 4096) only to
// find the k absent positions of largest |g|. In PyTorch that is |g|, a scatter of -inf at the
// present keys, a comparison and a nonzero, four passes over the chunk plus temporaries; here it
// is one read of the chunk, split across threads into fixed ranges so the output (ascending) does
// not depend on the thread count. The threshold comes from the caller (a sample estimate); the
// exact top-k then runs on the few candidates (sparsestart/selection.py). The membership test
// merges two sorted lists instead of a binary search per value.
//
// SET's growth samples k distinct absent positions: draws with replacement made distinct
// (torch.unique sorts them: O(m log m)) and ranks mapped to keys (a binary search each). Here the
// distinct values come from a bitmap of [0, n) (n bits, only when n is at most 512 bits per draw)
// scanned in order, and the ranks are mapped by one merge with the present keys. Both return
// exactly what their PyTorch twins (sparsestart/_native.py) return, so the random stream and the
// sampled structure do not depend on which ran.

#include <ATen/Parallel.h>

#include "checks.h"
#include "pool.h"
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sparsestart {
namespace {

// The i in [lo, hi) with |s[i]| >= t, ascending, as offsets i - lo into `buf` (room for hi - lo + 16);
// returns their number. A few percent pass, at random: with AVX-512 (float32) 16 comparisons give a
// mask whose passing offsets one compress writes out, no branch on the data; elsewhere a plain loop,
// whose rarely taken branch costs less than the unconditional stores of a branch-free one.
template <typename scalar_t>
int64_t at_least_range(const scalar_t* s, int64_t lo, int64_t hi, scalar_t t, int32_t* buf) {
  int64_t c = 0, i = lo;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m512 tv = _mm512_set1_ps(t);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i offs = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= hi; i += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(s + i));
      const __mmask16 m = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
      _mm512_storeu_si512(buf + c, _mm512_maskz_compress_epi32(m, offs));
      c += __builtin_popcount(static_cast<unsigned>(m));
      offs = _mm512_add_epi32(offs, step);
    }
  }
#endif
  for (; i < hi; ++i)
    if (std::abs(s[i]) >= t) buf[c++] = static_cast<int32_t>(i - lo);
  return c;
}

// The absent i in [lo, hi) with |s[i]| >= threshold, ascending, as offsets i - lo into `out`: the
// candidates above, then those present removed. Many candidates: through a bitmap of the range's
// present keys (`bits`, room for hi - lo bits; a write per present key, a branch-free test per
// candidate); few: a binary search each among the range's present keys.
template <typename scalar_t>
void collect_range(const scalar_t* s, int64_t lo, int64_t hi, const int64_t* present, int64_t p, int64_t base,
                   double threshold, int32_t* buf, std::vector<uint64_t>& bits, std::vector<int32_t>& out) {
  const int64_t c = at_least_range(s, lo, hi, static_cast<scalar_t>(threshold), buf);
  const int64_t* p0 = std::lower_bound(present, present + p, base + lo);
  const int64_t* p1 = std::lower_bound(p0, present + p, base + hi);
  int64_t w = 0;
  if (c * 8 < p1 - p0) {
    for (int64_t a = 0; a < c; ++a) {
      const int32_t off = buf[a];
      buf[w] = off;
      w += !std::binary_search(p0, p1, base + lo + off);
    }
  } else {
    std::fill(bits.begin(), bits.end(), 0);
    for (const int64_t* q = p0; q < p1; ++q) {
      const int64_t off = *q - base - lo;
      bits[off >> 6] |= uint64_t{1} << (off & 63);
    }
    for (int64_t a = 0; a < c; ++a) {
      const int32_t off = buf[a];
      buf[w] = off;
      w += !((bits[off >> 6] >> (off & 63)) & 1);
    }
  }
  out.assign(buf, buf + w);
}

std::tuple<at::Tensor, at::Tensor> absent_at_least_cpu(const at::Tensor& scores_in, const at::Tensor& present_in,
                                                       int64_t base, double threshold) {
  TORCH_CHECK_VALUE(scores_in.dim() == 1, "sparsestart.absent_at_least: scores must be 1-D, got ", scores_in.dim(),
                    "-D");
  TORCH_CHECK_TYPE(present_in.scalar_type() == at::kLong, "sparsestart.absent_at_least: present must be int64, got ",
                   present_in.scalar_type());
  TORCH_CHECK_TYPE(scores_in.scalar_type() == at::kFloat || scores_in.scalar_type() == at::kDouble,
                   "sparsestart.absent_at_least: scores must be float32 or float64, got ", scores_in.scalar_type());
  auto scores = scores_in.contiguous();
  auto present = present_in.contiguous();
  const int64_t n = scores.numel(), p = present.numel();
  const int64_t* P = present.data_ptr<int64_t>();
  // Fixed ranges (not one per thread): the result is the same for every thread count.
  constexpr int64_t kRange = 1 << 16;
  const int64_t ranges = (n + kRange - 1) / kRange;
  at::Tensor out, magnitudes;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sparsestart_absent_at_least", [&] {
    const scalar_t* S = scores.data_ptr<scalar_t>();
    // Per range: the candidates' offsets from its start and their |score|, read while the range is
    // in cache (a gather afterwards would stream the whole gradient from memory again).
    std::vector<std::vector<int32_t>> found(ranges);
    std::vector<std::vector<scalar_t>> found_abs(ranges);
    at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> buf(kRange + 16);
      std::vector<uint64_t> bits(kRange / 64);
      for (int64_t r = r0; r < r1; ++r) {
        collect_range(S, r * kRange, std::min(n, (r + 1) * kRange), P, p, base, threshold, buf.data(), bits,
                      found[r]);
        found_abs[r].resize(found[r].size());
        for (size_t j = 0; j < found[r].size(); ++j) found_abs[r][j] = std::abs(S[r * kRange + found[r][j]]);
      }
    });
    std::vector<int64_t> offset(ranges + 1, 0);
    for (int64_t r = 0; r < ranges; ++r) offset[r + 1] = offset[r] + static_cast<int64_t>(found[r].size());
    out = cpu::pooled_empty({offset[ranges]}, present.options());
    magnitudes = cpu::pooled_empty({offset[ranges]}, scores.options());
    int64_t* O = out.data_ptr<int64_t>();
    scalar_t* A = magnitudes.data_ptr<scalar_t>();
    at::parallel_for(0, ranges, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (size_t j = 0; j < found[r].size(); ++j) O[offset[r] + j] = r * kRange + found[r][j];
        std::copy(found_abs[r].begin(), found_abs[r].end(), A + offset[r]);
      }
    });
  });
  return {out, magnitudes};
}

// Membership of ascending values in an ascending set by merging: the values in fixed chunks (in
// parallel; a chunk finds its start in the set by binary search), so a sample of 32K keys against a
// layer's 860K present keys (RigL's threshold sample) walks the set on every thread at once. Both
// orders are checked first, in passes of their own (a search skips parts of the set, where an
// order check inside the merge would not look).
at::Tensor sorted_isin_cpu(const at::Tensor& values_in, const at::Tensor& set_in) {
  TORCH_CHECK_TYPE(values_in.scalar_type() == at::kLong && set_in.scalar_type() == at::kLong,
                   "sparsestart.sorted_isin: values and set must be int64, got ", values_in.scalar_type(), " and ",
                   set_in.scalar_type());
  auto values = values_in.contiguous().view(-1);
  auto set = set_in.contiguous().view(-1);
  const int64_t k = values.numel(), m = set.numel();
  const int64_t* V = values.data_ptr<int64_t>();
  const int64_t* S = set.data_ptr<int64_t>();
  const int64_t bad_v = cpu::first_out_of_order(V, k, false), bad_s = cpu::first_out_of_order(S, m, false);
  TORCH_CHECK_VALUE(bad_v == k, "sparsestart.sorted_isin: values are not sorted ascending: values[", bad_v - 1,
                    "] = ", bad_v < k ? V[bad_v - 1] : 0, " > values[", bad_v, "] = ", bad_v < k ? V[bad_v] : 0);
  TORCH_CHECK_VALUE(bad_s == m, "sparsestart.sorted_isin: set is not sorted ascending: set[", bad_s - 1, "] = ",
                    bad_s < m ? S[bad_s - 1] : 0, " > set[", bad_s, "] = ", bad_s < m ? S[bad_s] : 0);
  auto out = at::empty({k}, values.options().dtype(at::kBool));
  bool* O = out.data_ptr<bool>();
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, (k + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, i1 = std::min(k, i0 + kChunk);
      int64_t j = std::lower_bound(S, S + m, V[i0]) - S;
      for (int64_t i = i0; i < i1; ++i) {
        while (j < m && S[j] < V[i]) ++j;
        O[i] = j < m && S[j] == V[i];
      }
    }
  });
  return out;
}

at::Tensor sorted_distinct_cpu(const at::Tensor& values_in, int64_t n) {
  TORCH_CHECK_TYPE(values_in.scalar_type() == at::kLong, "sparsestart.sorted_distinct: values must be int64, got ",
                   values_in.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, "sparsestart.sorted_distinct: n must be >= 0, got ", n);
  auto values = values_in.contiguous().view(-1);
  const int64_t m = values.numel();
  const int64_t* V = values.data_ptr<int64_t>();
  std::vector<uint64_t> bits((n + 63) / 64, 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t v = V[i];
    TORCH_CHECK_VALUE(v >= 0 && v < n, "sparsestart.sorted_distinct: values[", i, "] = ", v, " is outside [0, n=", n,
                      ")");
    bits[v >> 6] |= uint64_t{1} << (v & 63);
  }
  int64_t count = 0;
  for (const uint64_t w : bits) count += __builtin_popcountll(w);
  auto out = at::empty({count}, values.options());
  int64_t* O = out.data_ptr<int64_t>();
  for (size_t w = 0; w < bits.size(); ++w) {
    for (uint64_t word = bits[w]; word; word &= word - 1)
      *O++ = static_cast<int64_t>(w) * 64 + __builtin_ctzll(word);
  }
  return out;
}

at::Tensor absent_at_ranks_cpu(const at::Tensor& present_in, const at::Tensor& ranks_in) {
  TORCH_CHECK_TYPE(present_in.scalar_type() == at::kLong && ranks_in.scalar_type() == at::kLong,
                   "sparsestart.absent_at_ranks: present and ranks must be int64, got ", present_in.scalar_type(),
                   " and ", ranks_in.scalar_type());
  auto present = present_in.contiguous().view(-1);
  auto ranks = ranks_in.contiguous().view(-1);
  const int64_t p = present.numel(), k = ranks.numel();
  const int64_t* P = present.data_ptr<int64_t>();
  const int64_t* Rk = ranks.data_ptr<int64_t>();
  auto out = at::empty({k}, ranks.options());
  int64_t* O = out.data_ptr<int64_t>();
  // With s_j the present keys ascending, s_j - j absent keys lie below s_j, so the r-th absent key
  // is r + #{j : s_j - j <= r}; ascending ranks move that count forward only.
  int64_t j = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t r = Rk[i];
    TORCH_CHECK_VALUE(r >= 0 && (i == 0 || r >= Rk[i - 1]), "sparsestart.absent_at_ranks: ranks must be "
                      "non-negative and ascending, got ranks[", i, "] = ", r, i ? " after " : "",
                      i ? std::to_string(Rk[i - 1]) : std::string());
    while (j < p && P[j] - j <= r) {
      TORCH_CHECK_VALUE(j == 0 || P[j] > P[j - 1], "sparsestart.absent_at_ranks: present is not sorted and "
                        "distinct at present[", j, "] = ", P[j]);
      ++j;
    }
    O[i] = r + j;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) {
  m.impl("_native_sorted_distinct", &sorted_distinct_cpu);
  m.impl("_native_absent_at_ranks", &absent_at_ranks_cpu);
  m.impl("_native_absent_at_least", &absent_at_least_cpu);
  m.impl("_native_sorted_isin", &sorted_isin_cpu);
}

}  // namespace sparsestart
