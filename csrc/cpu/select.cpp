// Candidate selection for RigL's growth on CPU: one pass over a dense gradient chunk.
//
//   _native_absent_at_least(scores [n] float32/float64, present [p] int64 sorted, base int, threshold float)
//     -> ascending int64 i in [0, n) with |scores[i]| >= threshold and base + i not in `present`
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
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace sparsestart {
namespace {

template <typename scalar_t>
void collect_range(const scalar_t* s, int64_t lo, int64_t hi, const int64_t* present, int64_t p, int64_t base,
                   double threshold, std::vector<int64_t>& out) {
  // First present key at or after base + lo.
  int64_t j = std::lower_bound(present, present + p, base + lo) - present;
  const scalar_t t = static_cast<scalar_t>(threshold);
  for (int64_t i = lo; i < hi; ++i) {
    if (std::abs(s[i]) >= t) {
      const int64_t key = base + i;
      while (j < p && present[j] < key) ++j;
      if (j < p && present[j] == key) continue;
      out.push_back(i);
    }
  }
}

at::Tensor absent_at_least_cpu(const at::Tensor& scores_in, const at::Tensor& present_in, int64_t base,
                               double threshold) {
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
  std::vector<std::vector<int64_t>> found(ranges);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sparsestart_absent_at_least", [&] {
    const scalar_t* S = scores.data_ptr<scalar_t>();
    at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        collect_range(S, r * kRange, std::min(n, (r + 1) * kRange), P, p, base, threshold, found[r]);
    });
  });
  int64_t total = 0;
  for (const auto& f : found) total += static_cast<int64_t>(f.size());
  auto out = at::empty({total}, present.options());
  int64_t* O = out.data_ptr<int64_t>();
  for (const auto& f : found) O = std::copy(f.begin(), f.end(), O);
  return out;
}

at::Tensor sorted_isin_cpu(const at::Tensor& values_in, const at::Tensor& set_in) {
  TORCH_CHECK_TYPE(values_in.scalar_type() == at::kLong && set_in.scalar_type() == at::kLong,
                   "sparsestart.sorted_isin: values and set must be int64, got ", values_in.scalar_type(), " and ",
                   set_in.scalar_type());
  auto values = values_in.contiguous().view(-1);
  auto set = set_in.contiguous().view(-1);
  const int64_t k = values.numel(), m = set.numel();
  const int64_t* V = values.data_ptr<int64_t>();
  const int64_t* S = set.data_ptr<int64_t>();
  auto out = at::empty({k}, values.options().dtype(at::kBool));
  bool* O = out.data_ptr<bool>();
  int64_t j = 0;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(i == 0 || V[i] >= V[i - 1], "sparsestart.sorted_isin: values are not sorted ascending: values[",
                      i - 1, "] = ", V[i - 1], " > values[", i, "] = ", V[i]);
    while (j < m && S[j] < V[i]) {
      TORCH_CHECK_VALUE(j == 0 || S[j] >= S[j - 1], "sparsestart.sorted_isin: set is not sorted ascending: set[",
                        j - 1, "] = ", S[j - 1], " > set[", j, "] = ", S[j]);
      ++j;
    }
    O[i] = j < m && S[j] == V[i];
  }
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
