// Structure updates of a compressed index on CPU: _native_merge_index (one view, below) and
// _native_rewire (RigL/SET's drop + grow by keys, both views at once, further below).
//
// Buffers (I = int32 or int64 for ptr/idx/slot, int64 for the new entries):
//   ptr  [R + 1], idx [C], slot [C]   the current view; entries ptr[r]..ptr[r+1] of major r
//                                     sorted by minor index idx
//   keep [ptr[R]] bool                which current entries stay
//   new_major, new_minor, new_slot [k] int64   entries to add, sorted by (major, minor)
// Output: (ptr', idx', slot') with ptr' [R + 1] and idx'/slot' [total], total = kept + k,
// every major's kept and new entries merged by minor index.
//
// Why native: RigL/SET rewrite up to 30% of a layer's entries at each update, and the
// pure-PyTorch merge (sparsestart/formats/compressed.py, used without the extension or
// off the CPU) needs a few dozen full passes over the index; this is one sequential pass
// per view, so an update stays a small fraction of the training time between updates.
// A new entry equal to a kept one is an error (checked before the caller changes anything:
// the result is written to fresh tensors). Majors are merged in parallel (see below).

#include <torch/library.h>
#include <torch/torch.h>

#include <ATen/Parallel.h>

#include "checks.h"
#include "pool.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsestart {
namespace {

// Compacts the entries e0..e1 of a view where keep(e) into (minor, slot) arrays KI/KS (room for
// e1 - e0), branch-free; returns their number.
template <typename index_t, typename Keep>
int64_t compact_kept(const index_t* I, const index_t* S, int64_t e0, int64_t e1, Keep&& keep, index_t* KI,
                     index_t* KS) {
  int64_t c = 0;
  for (int64_t e = e0; e < e1; ++e) {
    KI[c] = I[e];
    KS[c] = S[e];
    c += keep(e);
  }
  return c;
}

// Merge of one major's kept entries (minor KI[a], slot KS[a], compacted) with its new ones (minor
// NI[b], slot NS[b]), both ascending by minor, into OI/OS. Run by run: before each new entry the
// kept ones below it are copied in a loop whose exit is the only hard-to-predict branch, one per new
// entry (RigL/SET add about one new entry per three kept); a merge deciding every element on its own
// chains each step's loads to the previous comparison.
template <typename index_t>
void merge_major(const index_t* KI, const index_t* KS, int64_t nk, const int64_t* NI, const int64_t* NS, int64_t nn,
                 index_t* OI, index_t* OS) {
  int64_t a = 0, out = 0;
  for (int64_t b = 0; b < nn; ++b) {
    const int64_t v = NI[b];
    while (a < nk && static_cast<int64_t>(KI[a]) < v) {
      OI[out] = KI[a];
      OS[out] = KS[a];
      ++a;
      ++out;
    }
    OI[out] = static_cast<index_t>(v);
    OS[out] = static_cast<index_t>(NS[b]);
    ++out;
  }
  for (; a < nk; ++a, ++out) {
    OI[out] = KI[a];
    OS[out] = KS[a];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_index_cpu(const at::Tensor& ptr_in, const at::Tensor& idx_in,
                                                               const at::Tensor& slot_in, const at::Tensor& keep_in,
                                                               const at::Tensor& major_in, const at::Tensor& minor_in,
                                                               const at::Tensor& nslot_in, int64_t total) {
  TORCH_CHECK_VALUE(ptr_in.dim() == 1 && ptr_in.numel() >= 1, "sparsestart.merge_index: ptr must be 1-D, non-empty");
  TORCH_CHECK_TYPE(keep_in.scalar_type() == at::kBool, "sparsestart.merge_index: keep must be bool");
  TORCH_CHECK_TYPE(major_in.scalar_type() == at::kLong && minor_in.scalar_type() == at::kLong &&
                       nslot_in.scalar_type() == at::kLong,
                   "sparsestart.merge_index: new entries must be int64");
  auto ptr = ptr_in.contiguous(), idx = idx_in.contiguous(), slot = slot_in.contiguous();
  auto keep = keep_in.contiguous(), major = major_in.contiguous(), minor = minor_in.contiguous(),
       nslot = nslot_in.contiguous();
  const int64_t R = ptr.numel() - 1, k = major.numel();
  TORCH_CHECK_VALUE(minor.numel() == k && nslot.numel() == k,
                    "sparsestart.merge_index: new_major, new_minor and new_slot must have equal lengths");
  auto optr = at::empty_like(ptr);
  auto oidx = at::empty({total}, idx.options());
  auto oslot = at::empty({total}, slot.options());
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "sparsestart_merge_index", [&] {
    const index_t* P = ptr.data_ptr<index_t>();
    const index_t* I = idx.data_ptr<index_t>();
    const index_t* S = slot.data_ptr<index_t>();
    const bool* keepp = keep.data_ptr<bool>();
    const int64_t nnz = P[R];
    TORCH_CHECK_VALUE(keep.numel() == nnz, "sparsestart.merge_index: keep has ", keep.numel(), " entries, the index ",
                      nnz);
    const int64_t* MJ = major.data_ptr<int64_t>();
    const int64_t* MN = minor.data_ptr<int64_t>();
    const int64_t* NS = nslot.data_ptr<int64_t>();
    index_t* OP = optr.data_ptr<index_t>();
    index_t* OI = oidx.data_ptr<index_t>();
    index_t* OS = oslot.data_ptr<index_t>();
    // Each major's new entries: NB[r] .. NB[r + 1] (one pass; checks the order by major).
    std::vector<int64_t> NB(R + 1);
    {
      int64_t j = 0;
      for (int64_t r = 0; r < R; ++r) {
        NB[r] = j;
        while (j < k && MJ[j] == r) ++j;
        TORCH_CHECK_VALUE(j >= k || MJ[j] > r, "sparsestart.merge_index: new entries are not sorted by major index");
      }
      NB[R] = j;
      TORCH_CHECK_VALUE(j == k, "sparsestart.merge_index: new entries have major indices outside [0, ", R, ")");
    }
    // Majors are merged in parallel chunks: first every major's output count (kept + new), then, from
    // their prefix sums, each major into its own output range. The result does not depend on the
    // thread count. A chunk holds enough entries to be worth a task.
    const int64_t grain = std::max<int64_t>(1, R * int64_t{1 << 15} / std::max<int64_t>(1, nnz + k));
    std::vector<int64_t> count(R);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t c = NB[r + 1] - NB[r];
        for (int64_t e = P[r]; e < P[r + 1]; ++e) c += keepp[e];
        count[r] = c;
      }
    });
    int64_t out_total = 0;
    OP[0] = 0;
    for (int64_t r = 0; r < R; ++r) {
      out_total += count[r];
      OP[r + 1] = static_cast<index_t>(std::min(out_total, total));
    }
    TORCH_CHECK_VALUE(out_total == total, "sparsestart.merge_index: merged ", out_total, " entries, expected total=",
                      total);
    // Each major: its kept entries compacted into buffers, then merged with its new entries run by
    // run (merge_major). A new entry equal to a kept one, or new entries out of order, leave two
    // output minors of the major out of strict order: one check pass flags the major, and the first
    // flagged one is diagnosed afterwards, outside the parallel region.
    std::vector<char> bad(R, 0);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      std::vector<index_t> KI, KS;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e0 = P[r], e1 = P[r + 1], j0 = NB[r], jend = NB[r + 1];
        KI.resize(e1 - e0);
        KS.resize(e1 - e0);
        const int64_t c = compact_kept(I, S, e0, e1, [&](int64_t e) { return keepp[e]; }, KI.data(), KS.data());
        merge_major<index_t>(KI.data(), KS.data(), c, MN + j0, NS + j0, jend - j0, OI + OP[r], OS + OP[r]);
        const int64_t out = OP[r] + c + (jend - j0);
        bool ordered = true;
        for (int64_t o = OP[r] + 1; o < out; ++o) ordered &= OI[o] > OI[o - 1];
        bad[r] = !ordered;
      }
    });
    const int64_t first_bad = std::find(bad.begin(), bad.end(), 1) - bad.begin();
    if (first_bad < R) {
      const int64_t r = first_bad;
      for (int64_t j = NB[r]; j + 1 < NB[r + 1]; ++j)
        TORCH_CHECK_VALUE(MN[j + 1] > MN[j], "sparsestart.merge_index: new entries are not sorted or contain "
                          "duplicates: (", r, ", ", MN[j], ") is followed by (", r, ", ", MN[j + 1], ")");
      for (int64_t j = NB[r]; j < NB[r + 1]; ++j)
        for (int64_t e = P[r]; e < P[r + 1]; ++e)
          TORCH_CHECK_VALUE(!keepp[e] || static_cast<int64_t>(I[e]) != MN[j], "entry (", r, ", ", MN[j],
                            ") is already stored; grow only adds new entries");
      TORCH_CHECK(false, "sparsestart.merge_index: the index of major ", r, " is not sorted by minor index");
    }
  });
  return {optr, oidx, oslot};
}

// Keys major * minor_extent + minor of a view's entries in index order, only those where `keep` is
// true when it is given: what RigL/SET need of the kept entries, without the int64 major, minor and
// slot copies of the whole index that coo() makes. Majors in parallel chunks (count, prefix, write).
at::Tensor kept_keys_cpu(const at::Tensor& ptr_in, const at::Tensor& idx_in, const c10::optional<at::Tensor>& keep_in,
                         int64_t minor_extent) {
  TORCH_CHECK_VALUE(ptr_in.dim() == 1 && ptr_in.numel() >= 1, "sparsestart.kept_keys: ptr must be 1-D, non-empty");
  TORCH_CHECK_VALUE(minor_extent >= 0, "sparsestart.kept_keys: minor_extent must be >= 0, got ", minor_extent);
  auto ptr = ptr_in.contiguous(), idx = idx_in.contiguous();
  const bool masked = keep_in.has_value() && keep_in->defined();
  at::Tensor keep;
  if (masked) {
    keep = keep_in->contiguous();
    TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "sparsestart.kept_keys: keep must be bool, got ",
                     keep.scalar_type());
  }
  const int64_t R = ptr.numel() - 1;
  at::Tensor out;
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "sparsestart_kept_keys", [&] {
    const index_t* P = ptr.data_ptr<index_t>();
    const index_t* I = idx.data_ptr<index_t>();
    const int64_t nnz = P[R];
    TORCH_CHECK_VALUE(nnz <= idx.numel(), "sparsestart.kept_keys: ptr ends at ", nnz, " but idx has ", idx.numel(),
                      " entries");
    TORCH_CHECK_VALUE(!masked || keep.numel() == nnz, "sparsestart.kept_keys: keep has ", keep.numel(),
                      " entries, the index ", nnz);
    const bool* K = masked ? keep.data_ptr<bool>() : nullptr;
    const int64_t rows_per_chunk = std::max<int64_t>(1, R * int64_t{1 << 16} / std::max<int64_t>(1, nnz));
    const int64_t chunks = R == 0 ? 0 : (R + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<int64_t> offset(chunks + 1, 0);
    if (masked) {
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t n = 0;
          const int64_t e1 = P[std::min(R, (c + 1) * rows_per_chunk)];
          for (int64_t e = P[c * rows_per_chunk]; e < e1; ++e) n += K[e];
          offset[c + 1] = n;
        }
      });
    } else {
      for (int64_t c = 0; c < chunks; ++c)
        offset[c + 1] = P[std::min(R, (c + 1) * rows_per_chunk)] - P[c * rows_per_chunk];
    }
    for (int64_t c = 0; c < chunks; ++c) offset[c + 1] += offset[c];
    out = cpu::pooled_empty({offset[chunks]}, ptr.options().dtype(at::kLong));  // MBs at every RigL/SET update
    int64_t* O = out.data_ptr<int64_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t o = offset[c];
        const int64_t end = offset[c + 1];
        for (int64_t r = c * rows_per_chunk; r < std::min(R, (c + 1) * rows_per_chunk); ++r) {
          const int64_t base = r * minor_extent;
          for (int64_t e = P[r]; e < P[r + 1]; ++e) {
            if (o < end) O[o] = base + static_cast<int64_t>(I[e]);  // written always, kept when `keep`
            o += masked ? K[e] : 1;
          }
        }
      }
    });
  });
  return out;
}

// Strictly ascending check of an int64 list with values in [lo, hi): branch-free over the list, the
// first offending element named afterwards.
void check_ascending_in(const int64_t* v, int64_t n, int64_t lo, int64_t hi, const char* what) {
  if (n == 0) return;
  const int64_t i = cpu::first_out_of_order(v, n, /*strict=*/true);
  TORCH_CHECK_VALUE(i == n, "sparsestart.rewire: ", what, " must be ascending and distinct, but ", v[i - 1],
                    " at index ", i - 1, " is followed by ", v[i]);
  TORCH_CHECK_VALUE(v[0] >= lo && v[n - 1] < hi, "sparsestart.rewire: ", what, " must lie in [", lo, ", ", hi,
                    "), got range [", v[0], ", ", v[n - 1], "]");
}

// RigL/SET's whole structure rewrite in one op: drop the entries at the CSR positions `drop` and grow
// the entries with keys row * Q + col in `grow` (both int64, ascending, distinct). A grown key that is
// the key of a dropped entry keeps that entry as it is (its slot, so its value and optimizer state:
// RigL's "regrown" positions); a grown key equal to an entry that is not dropped is an error. New
// entries take free slots in CSR order: first the current free tail slot[nnz:], then the slots freed
// here in CSR order. Returns fresh tensors
//   (rowptr', col', slot', colptr', row', slot_t', free_tail', freed, new_slots)
// where free_tail' [C - nnz'] is the new tail of slot/slot_t, freed (int64) the slots of the dropped
// entries (CSR order) and new_slots (int64) the slots of the new entries (CSR order). The same result,
// bit for bit, as keys_at + isin_sorted + replace (sparsestart/formats/update.py), which runs off the
// CPU; here: a stamped column map per thread instead of searches, no int64 copies of the index, and
// outputs and scratch from the extension's pool.
std::vector<at::Tensor> rewire_cpu(const at::Tensor& rowptr_in, const at::Tensor& col_in, const at::Tensor& slot_in,
                                   const at::Tensor& colptr_in, const at::Tensor& row_in,
                                   const at::Tensor& slot_t_in, const at::Tensor& drop_in,
                                   const at::Tensor& grow_in) {
  TORCH_CHECK_VALUE(rowptr_in.dim() == 1 && rowptr_in.numel() >= 1 && colptr_in.dim() == 1 &&
                        colptr_in.numel() >= 1,
                    "sparsestart.rewire: rowptr and colptr must be 1-D, non-empty");
  for (const at::Tensor* t : {&col_in, &slot_in, &colptr_in, &row_in, &slot_t_in})
    TORCH_CHECK_TYPE(t->scalar_type() == rowptr_in.scalar_type(),
                     "sparsestart.rewire: index tensors must share one dtype, got ", rowptr_in.scalar_type(),
                     " and ", t->scalar_type());
  TORCH_CHECK_TYPE(drop_in.scalar_type() == at::kLong && grow_in.scalar_type() == at::kLong,
                   "sparsestart.rewire: drop positions and grow keys must be int64, got ", drop_in.scalar_type(),
                   " and ", grow_in.scalar_type());
  TORCH_CHECK_VALUE(drop_in.dim() == 1 && grow_in.dim() == 1, "sparsestart.rewire: drop and grow must be 1-D");
  auto rowptr = rowptr_in.contiguous(), col = col_in.contiguous(), slot = slot_in.contiguous();
  auto colptr = colptr_in.contiguous(), row = row_in.contiguous(), slot_t = slot_t_in.contiguous();
  auto drop = drop_in.contiguous(), grow = grow_in.contiguous();
  const int64_t R = rowptr.numel() - 1, Q = colptr.numel() - 1, C = col.numel();
  TORCH_CHECK_VALUE(slot.numel() == C && row.numel() == C && slot_t.numel() == C,
                    "sparsestart.rewire: col, slot, row and slot_t must have the capacity's length ", C);
  std::vector<at::Tensor> out;
  AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), "sparsestart_rewire", [&] {
    const index_t* P = rowptr.data_ptr<index_t>();
    const index_t* I = col.data_ptr<index_t>();
    const index_t* S = slot.data_ptr<index_t>();
    const index_t* CP = colptr.data_ptr<index_t>();
    const index_t* RI = row.data_ptr<index_t>();
    const index_t* ST = slot_t.data_ptr<index_t>();
    const int64_t nnz = P[R];
    TORCH_CHECK_VALUE(nnz >= 0 && nnz <= C && static_cast<int64_t>(CP[Q]) == nnz,
                      "sparsestart.rewire: rowptr ends at ", nnz, ", colptr at ", static_cast<int64_t>(CP[Q]),
                      ", capacity ", C);
    const int64_t* D = drop.data_ptr<int64_t>();
    const int64_t* G = grow.data_ptr<int64_t>();
    const int64_t nd = drop.numel(), ng = grow.numel();
    check_ascending_in(D, nd, 0, nnz, "drop positions");
    check_ascending_in(G, ng, 0, R * Q, "grow keys");
    const int64_t grain = std::max<int64_t>(1, R * int64_t{1 << 15} / std::max<int64_t>(1, nnz + ng));
    // Rows in `parts` fixed ranges for the passes that keep per-part state.
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / grain));
    // Each row's drops DB[r]..DB[r+1] and grows GB[r]..GB[r+1]: per part, a binary search for its first
    // row, then one sweep (every drop lies below nnz = P[R] and every grow below R * Q, checked above).
    std::vector<int64_t> DB(R + 1), GB(R + 1);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        const int64_t r0 = R * part / parts, r1 = R * (part + 1) / parts;
        int64_t d = std::lower_bound(D, D + nd, static_cast<int64_t>(P[r0])) - D;
        int64_t g = std::lower_bound(G, G + ng, r0 * Q) - G;
        for (int64_t r = r0; r < r1; ++r) {
          DB[r] = d;
          GB[r] = g;
          while (d < nd && D[d] < static_cast<int64_t>(P[r + 1])) ++d;
          while (g < ng && G[g] < (r + 1) * Q) ++g;
        }
      }
    });
    DB[R] = nd;
    GB[R] = ng;
    // Pass 1, per row with a map over the columns (low bits 1 kept, 2 dropped, | 4 grown; above them the
    // row's stamp r + 1, so the map is never cleared): which drops are regrown (dflag), which grows
    // regrow a dropped entry (gflag), and a grow onto a kept entry (bad).
    // Scratch and outputs of a few MB each come from the extension's pool (csrc/cpu/pool.h): fresh
    // blocks would be page-faulted in on every update under glibc's default malloc (about half the
    // op's time on a 4096 x 4096 layer at density 0.1).
    auto dflag_t = cpu::pooled_scratch<uint8_t>(nd), gflag_t = cpu::pooled_scratch<uint8_t>(ng);
    uint8_t* dflag = dflag_t.data_ptr<uint8_t>();
    uint8_t* gflag = gflag_t.data_ptr<uint8_t>();
    std::vector<int64_t> FO(R + 1, 0), NO(R + 1, 0);  // counts, then offsets, of freed / new entries
    std::vector<char> bad(R, 0);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      std::vector<uint64_t> map(Q, 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * Q;
        const uint64_t stamp = static_cast<uint64_t>(r + 1) << 3;
        for (int64_t e = P[r]; e < P[r + 1]; ++e) map[I[e]] = stamp | 1;
        for (int64_t d = DB[r]; d < DB[r + 1]; ++d) map[I[D[d]]] = stamp | 2;
        int64_t regrown = 0;
        bool hit = false;
        for (int64_t g = GB[r]; g < GB[r + 1]; ++g) {
          const int64_t c = G[g] - base;
          const uint64_t v = map[c];
          const uint64_t state = (v >> 3) == static_cast<uint64_t>(r + 1) ? (v & 3) : 0;  // 0: absent
          hit |= state == 1;
          gflag[g] = state == 2;
          regrown += state == 2;
          map[c] = stamp | state | 4;
        }
        for (int64_t d = DB[r]; d < DB[r + 1]; ++d) dflag[d] = (map[I[D[d]]] >> 2) & 1;
        bad[r] = hit;
        FO[r + 1] = DB[r + 1] - DB[r] - regrown;
        NO[r + 1] = GB[r + 1] - GB[r] - regrown;
      }
    });
    const int64_t first_bad = std::find(bad.begin(), bad.end(), 1) - bad.begin();
    if (first_bad < R) {
      const int64_t r = first_bad;
      for (int64_t g = GB[r]; g < GB[r + 1]; ++g) {
        const int64_t c = G[g] - r * Q;
        for (int64_t e = P[r], d = DB[r]; e < P[r + 1]; ++e) {
          while (d < DB[r + 1] && D[d] < e) ++d;
          const bool dropped = d < DB[r + 1] && D[d] == e;
          TORCH_CHECK_VALUE(dropped || static_cast<int64_t>(I[e]) != c, "entry (", r, ", ", c,
                            ") is already stored; grow only adds new entries");
        }
      }
      TORCH_CHECK(false, "sparsestart.rewire: row ", r, " flagged a grow onto a kept entry that was not found");
    }
    for (int64_t r = 0; r < R; ++r) {
      FO[r + 1] += FO[r];
      NO[r + 1] += NO[r];
    }
    const int64_t n_freed = FO[R], n_new = NO[R], tail = C - nnz;
    const int64_t total = nnz - n_freed + n_new;
    TORCH_CHECK_VALUE(n_new <= tail + n_freed, "growing ", n_new, " entries needs capacity ", total,
                      " but the structure has capacity ", C, "; build it with a larger capacity");
    auto iopt = rowptr.options();
    auto orowptr = cpu::pooled_empty({R + 1}, iopt), ocol = cpu::pooled_empty({total}, iopt);
    auto oslot = cpu::pooled_empty({total}, iopt), ocolptr = cpu::pooled_empty({Q + 1}, iopt);
    auto orow = cpu::pooled_empty({total}, iopt), oslot_t = cpu::pooled_empty({total}, iopt);
    auto ofree = cpu::pooled_empty({C - total}, iopt);
    auto freed = cpu::pooled_empty({n_freed}, iopt.dtype(at::kLong));
    auto new_slots = cpu::pooled_empty({n_new}, iopt.dtype(at::kLong));
    int64_t* F = freed.data_ptr<int64_t>();
    int64_t* NSL = new_slots.data_ptr<int64_t>();
    // Pass 2: the freed slots in CSR order, and how many entries each column loses (for the CSC view;
    // counted per part of the rows and summed, so no atomics).
    std::vector<std::vector<int64_t>> col_freed(parts);  // one column count per part
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        auto& lost = col_freed[part];
        lost.assign(Q, 0);
        for (int64_t r = R * part / parts; r < R * (part + 1) / parts; ++r) {
          int64_t o = FO[r];
          const int64_t end = FO[r + 1];
          for (int64_t d = DB[r]; d < DB[r + 1]; ++d) {
            const int64_t s = static_cast<int64_t>(S[D[d]]);
            const bool freed_here = !dflag[d];
            if (o < end) F[o] = s;  // written always, kept when freed
            o += freed_here;
            lost[I[D[d]]] += freed_here;
          }
        }
      }
    });
    // The i-th free slot after the drop: the old tail, then the freed slots.
    auto free_slot = [&](int64_t i) -> int64_t { return i < tail ? static_cast<int64_t>(S[nnz + i]) : F[i - tail]; };
    index_t* OP = orowptr.data_ptr<index_t>();
    OP[0] = 0;
    for (int64_t r = 0; r < R; ++r)
      OP[r + 1] = static_cast<index_t>(OP[r] + (P[r + 1] - P[r]) - (FO[r + 1] - FO[r]) + (NO[r + 1] - NO[r]));
    // Pass 3: every row's kept and new entries merged; the new entries' slots and columns kept for the CSC.
    auto new_col_t = cpu::pooled_scratch<int64_t>(n_new);
    int64_t* new_col = new_col_t.data_ptr<int64_t>();
    index_t* OI = ocol.data_ptr<index_t>();
    index_t* OS = oslot.data_ptr<index_t>();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      std::vector<index_t> KI, KS;
      std::vector<uint8_t> gone;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e0 = P[r], e1 = P[r + 1], n0 = NO[r];
        gone.assign(e1 - e0, 0);
        for (int64_t d = DB[r]; d < DB[r + 1]; ++d) gone[D[d] - e0] = !dflag[d];
        KI.resize(e1 - e0);
        KS.resize(e1 - e0);
        const int64_t nk =
            compact_kept(I, S, e0, e1, [&](int64_t e) { return !gone[e - e0]; }, KI.data(), KS.data());
        int64_t nn = 0;
        for (int64_t g = GB[r]; g < GB[r + 1]; ++g) {
          if (n0 + nn < NO[r + 1]) new_col[n0 + nn] = G[g] - r * Q;
          nn += !gflag[g];
        }
        for (int64_t j = 0; j < nn; ++j) NSL[n0 + j] = free_slot(n0 + j);
        merge_major<index_t>(KI.data(), KS.data(), nk, new_col + n0, NSL + n0, nn, OI + OP[r], OS + OP[r]);
      }
    });
    // The CSC view: the new and the freed entries by column (stable counting sorts keep their rows
    // ascending), then every column's entries less the freed ones (a subset of them in the same
    // order: one branch-free skip pass) merged with the new ones. The counting sorts run on the
    // row parts in parallel: part p writes a column's entries after those of parts p' < p (its rows
    // come later), at offsets from per-part column counts (the freed ones counted in pass 2).
    std::vector<std::vector<int64_t>> col_new(parts);  // one column count of new entries per part
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        auto& gained = col_new[part];
        gained.assign(Q, 0);
        for (int64_t j = NO[R * part / parts]; j < NO[R * (part + 1) / parts]; ++j) ++gained[new_col[j]];
      }
    });
    // Column starts of the new (NCB) and freed (FCB) entries, and every part's offsets into them.
    std::vector<int64_t> NCB(Q + 1, 0), FCB(Q + 1, 0);
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t q = 0; q < Q; ++q) {
        NCB[q + 1] += col_new[part][q];
        FCB[q + 1] += col_freed[part][q];
      }
    for (int64_t q = 0; q < Q; ++q) {
      NCB[q + 1] += NCB[q];
      FCB[q + 1] += FCB[q];
    }
    for (auto* counts : {&col_new, &col_freed}) {  // counts -> each part's next position per column
      const std::vector<int64_t>& start = counts == &col_new ? NCB : FCB;
      for (int64_t q = 0; q < Q; ++q) {
        int64_t at_ = start[q];
        for (int64_t part = 0; part < parts; ++part) {
          const int64_t c = (*counts)[part][q];
          (*counts)[part][q] = at_;
          at_ += c;
        }
      }
    }
    auto new_row_t = cpu::pooled_scratch<int64_t>(n_new), new_slot_c_t = cpu::pooled_scratch<int64_t>(n_new);
    auto freed_row_t = cpu::pooled_scratch<int64_t>(n_freed);
    int64_t* new_row = new_row_t.data_ptr<int64_t>();
    int64_t* new_slot_c = new_slot_c_t.data_ptr<int64_t>();
    int64_t* freed_row = freed_row_t.data_ptr<int64_t>();
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        auto& next_new = col_new[part];
        auto& next_freed = col_freed[part];
        for (int64_t r = R * part / parts; r < R * (part + 1) / parts; ++r) {
          for (int64_t j = NO[r]; j < NO[r + 1]; ++j) {
            const int64_t at_ = next_new[new_col[j]]++;
            new_row[at_] = r;
            new_slot_c[at_] = NSL[j];
          }
          for (int64_t d = DB[r]; d < DB[r + 1]; ++d)
            if (!dflag[d]) freed_row[next_freed[I[D[d]]]++] = r;
        }
      }
    });
    std::vector<int64_t> ckept(Q);  // entries of each column that stay
    for (int64_t q = 0; q < Q; ++q) ckept[q] = CP[q + 1] - CP[q] - (FCB[q + 1] - FCB[q]);
    index_t* OCP = ocolptr.data_ptr<index_t>();
    OCP[0] = 0;
    for (int64_t q = 0; q < Q; ++q) OCP[q + 1] = static_cast<index_t>(OCP[q] + ckept[q] + NCB[q + 1] - NCB[q]);
    const int64_t cgrain = std::max<int64_t>(1, Q * int64_t{1 << 15} / std::max<int64_t>(1, nnz + ng));
    index_t* OR = orow.data_ptr<index_t>();
    index_t* OST = oslot_t.data_ptr<index_t>();
    at::parallel_for(0, Q, cgrain, [&](int64_t q0, int64_t q1) {
      std::vector<index_t> KI, KS;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t e0 = CP[q], e1 = CP[q + 1];
        KI.resize(e1 - e0);
        KS.resize(e1 - e0);
        int64_t f = FCB[q];
        const int64_t fend = FCB[q + 1];
        const int64_t nk = compact_kept(RI, ST, e0, e1,
                                        [&](int64_t e) {
                                          const bool gone = f < fend && freed_row[f] == static_cast<int64_t>(RI[e]);
                                          f += gone;
                                          return !gone;
                                        },
                                        KI.data(), KS.data());
        merge_major<index_t>(KI.data(), KS.data(), nk, new_row + NCB[q], new_slot_c + NCB[q], NCB[q + 1] - NCB[q],
                             OR + OCP[q], OST + OCP[q]);
      }
    });
    index_t* OF = ofree.data_ptr<index_t>();
    for (int64_t i = 0; i < C - total; ++i) OF[i] = static_cast<index_t>(free_slot(n_new + i));
    out = {orowptr, ocol, oslot, ocolptr, orow, oslot_t, ofree, freed, new_slots};
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) {
  m.impl("_native_merge_index", &merge_index_cpu);
  m.impl("_native_kept_keys", &kept_keys_cpu);
  m.impl("_native_rewire", &rewire_cpu);
}

}  // namespace sparsestart
