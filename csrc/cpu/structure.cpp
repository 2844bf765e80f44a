// Structure update of a compressed index (CSR or its CSC view) on CPU: one merge pass.
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

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsestart {
namespace {

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
    // Each major: its kept entries' positions compacted into a buffer, then a branch-free merge with
    // its new entries (the data-dependent branches of a plain merge mispredict about half the time on
    // RigL/SET's random keys). A new entry equal to a kept one, or new entries out of order, leave two
    // output minors of the major out of strict order: one check pass flags the major, and the first
    // flagged one is diagnosed afterwards, outside the parallel region.
    std::vector<char> bad(R, 0);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> kept;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e0 = P[r], e1 = P[r + 1], j0 = NB[r], jend = NB[r + 1];
        kept.resize(e1 - e0);
        int64_t c = 0;
        for (int64_t e = e0; e < e1; ++e) {
          kept[c] = e;
          c += keepp[e];
        }
        int64_t a = 0, j = j0, out = OP[r];
        while (a < c && j < jend) {
          const int64_t old_e = kept[a];
          const int64_t old_minor = static_cast<int64_t>(I[old_e]), new_minor = MN[j];
          const bool take_new = new_minor < old_minor;
          OI[out] = static_cast<index_t>(take_new ? new_minor : old_minor);
          OS[out] = take_new ? static_cast<index_t>(NS[j]) : S[old_e];
          ++out;
          j += take_new;
          a += !take_new;
        }
        for (; a < c; ++a, ++out) {
          OI[out] = I[kept[a]];
          OS[out] = S[kept[a]];
        }
        for (; j < jend; ++j, ++out) {
          OI[out] = static_cast<index_t>(MN[j]);
          OS[out] = static_cast<index_t>(NS[j]);
        }
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
    out = at::empty({offset[chunks]}, ptr.options().dtype(at::kLong));
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

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) {
  m.impl("_native_merge_index", &merge_index_cpu);
  m.impl("_native_kept_keys", &kept_keys_cpu);
}

}  // namespace sparsestart
