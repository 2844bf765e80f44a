// Direct sparse 2-D convolution on CPU (stride 1, CSR weight), forward and backward,
// without materialising the unfolded (im2col) input.
//
// Buffers:
//   values [C]            weights by slot; entry e of output channel co has column
//                         c = ci*KH*KW + kh*KW + kw (the Conv2d weight viewed as [Cout, Cin*KH*KW])
//   ptr/idx/slot          CSR over output channels (forward, weight grad) or the CSC view
//                         over columns (input grad: ptr = colptr, idx = row, slot = slot_t)
//   x  [N, Cin, H, W]     input, NCHW contiguous
//   dy [N, Cout, Ho, Wo]  output gradient, NCHW contiguous
//   bias [Cout]           optional, forward only: added to y as it is written
//   out: y [N, Cout, Ho, Wo], dx [N, Cin, H, W], dV [C] (zero in free slots)
// with Ho = H + 2*ph - dh*(KH-1), Wo = W + 2*pw - dw*(KW-1).
//
// The idea: flatten each zero-padded plane of one sample. In a padded plane with
// rows Wp apart, output pixel (h, w) of a 3x3 convolution reads input pixels
// (h + kh*dh, w + kw*dw), i.e. flat position h*Wp + w plus the constant offset
// kh*dh*Wp + kw*dw. So over the flat axis q = h*Wp + w (w running over the whole
// row stride, the extra Wp - Wo columns computed and thrown away), every
// stored weight is one shifted contiguous input row:
//
//   forward      y'[co, q]  = sum_e v_e * xp[ci_e*plane + kh_e*dh*Wp + kw_e*dw + q]
//   input grad   dx'[ci, q] = sum_e v_e * dyp[co_e*plane + (shift of kh_e, kw_e) + q]
//   weight grad  dV[e]      = sum_n sum_q dyw[n, co_e, q] * xp[n, (offset of e) + q]
//
// These are exactly the CSR SpMM and SDDMM of spmm_kernel.h / sddmm_kernel.h
// with an input "row" given by a per-entry address instead of column * N, so
// the convolution runs on the same register-tiled SIMD kernels (tiles of up to
// 128 floats, kConvTile, full vectors except the last of a plane, weights broadcast
// once per tile) instead of small 2-D tiles with scalar edges. Each thread pads one
// group of G samples at a time into its own buffer (Cin*G*plane floats), which
// stays in L2 while every output channel sweeps it; no padded copy of the batch
// exists. The G samples' padded planes of one channel lie one after another, so
// the same constant offsets hold across them and one flat product covers the
// group: on small maps (4x4 and below) a single plane is only a vector or two and
// the per-weight overhead would dominate (see group_size).
// Each output element has one writer and a fixed summation order, and the
// weight gradient sums over a fixed number of sample chunks in chunk order, so
// results are bitwise identical for any thread count.
// Neighbouring rows and planes share their zero margins (see Pad). Reads past the
// last real column of a row land in the zeros before the next row's values or,
// for the last plane, in the tail rows and `slack` zeros appended to the buffer.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "pool.h"
#include "sddmm_kernel.h"
#include "spmm_kernel.h"

namespace sparsestart {
namespace {

struct Geometry {
  int64_t KH, KW, ph, pw, dh, dw;
};

Geometry geometry(at::IntArrayRef kernel, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(kernel.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "sparsestart.conv2d: kernel_size, padding and dilation must have two entries each");
  TORCH_CHECK_VALUE(kernel[0] > 0 && kernel[1] > 0 && dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 &&
                        padding[1] >= 0,
                    "sparsestart.conv2d: kernel_size and dilation must be positive and padding non-negative, got ",
                    kernel, ", ", dilation, ", ", padding);
  return {kernel[0], kernel[1], padding[0], padding[1], dilation[0], dilation[1]};
}

// dst[0..n) = src[0..n) (+ add), and dst[0..n) = v, with full vectors and one masked tail, inline:
// the padded copies and crops move rows of a few dozen elements, thousands per sample, where a
// memmove/memset call per row cost more than the data (3x3 256->256 at 8x8, batch 64, density
// 0.001: forward 0.98 -> 0.64 ms).
template <typename T>
inline void copy_row(const T* src, int64_t n, T* dst) {
  using V = simd::Vec<T>;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, V::load(src + i));
  if (i < n) V::store_n(dst + i, V::load_n(src + i, static_cast<int>(n - i)), static_cast<int>(n - i));
}
template <typename T>
inline void copy_row_plus(const T* src, int64_t n, T add, T* dst) {
  using V = simd::Vec<T>;
  const typename V::reg a = V::set1(add);
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, V::add(V::load(src + i), a));
  if (i < n) V::store_n(dst + i, V::add(V::load_n(src + i, static_cast<int>(n - i)), a), static_cast<int>(n - i));
}
template <typename T>
inline void fill_row(T* dst, int64_t n, T v) {
  using V = simd::Vec<T>;
  const typename V::reg a = V::set1(v);
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, a);
  if (i < n) V::store_n(dst + i, a, static_cast<int>(n - i));
}

// Zero padding of planes [P, h, w] with shared margins. Each row holds `left` zeros and then its
// w values, rows `ld` apart: the ld - w zeros after a row's values are also the left margin of
// the next row. Each plane holds `top` zero rows and then its h rows, planes `rows` rows apart:
// the zero rows after a plane's data are also the top margin of the next plane, and `tail` zero
// rows follow the last plane. A convolution reading up to `right` columns past a row (`bottom`
// rows past a plane) sees zeros as long as right <= ld - w (bottom <= rows - h + the next plane's
// top): with the margins shared, a 3x3 "same" convolution pads a row by one zero instead of two
// and a plane by one zero row instead of two, so the flat products below compute fewer thrown-away
// positions (4x4 maps: 25 positions per sample instead of 36; 2x2: 9 instead of 16).
struct Pad {
  int64_t planes, h, w;  // source planes [planes, h, w]
  int64_t top, left;     // zero rows above a plane's data, zeros before a row's values
  int64_t ld, rows;      // row stride (>= left + w), rows per plane (>= top + h)
  int64_t tail, slack;   // zero rows after the last plane, then zero elements
  int64_t plane() const { return rows * ld; }
  int64_t src_size() const { return planes * h * w; }
  // A group of G samples: every plane holds the G samples' padded planes one after another.
  int64_t size(int64_t G) const { return planes * G * plane() + tail * ld + slack; }
};

// Symmetric margins (top = bottom, left = right), the layout of the forward and input-gradient
// operands: the shared margins are enough on both sides. The flat product writes output (h, w)
// at h * ld + w of its sample's plane, so a plane also has at least `out_rows` rows and a row at
// least `out_cols` columns (more than h + top and w + left only when the padding exceeds the
// kernel's reach, e.g. padding 2 around a 3x3 kernel).
Pad shared_pad(int64_t planes, int64_t h, int64_t w, int64_t top, int64_t left, int64_t out_rows, int64_t out_cols,
               int64_t slack) {
  return {planes, h, w, top, left, std::max(w + left, out_cols), std::max(h + top, out_rows), top, slack};
}

// Samples 0 .. count - 1 of `src` (sample stride `stride`) into the group layout
// [planes][G][rows][ld] of `dst` (Pad::size(G) elements; missing samples, margins and the tail are
// zero), serially: the kernels pad one group into a small per-thread buffer right before using
// it, so the padded copy stays in cache and no padded copy of the whole batch is ever allocated
// (a fresh buffer of that size costs page faults on every call, more than the arithmetic at
// low density).
template <typename T>
void pad_group(const T* src, int64_t stride, int64_t count, int64_t G, const Pad& pd, T* dst) {
  const int64_t ld = pd.ld, plane = pd.plane();
  for (int64_t pl = 0; pl < pd.planes; ++pl)
    for (int64_t g = 0; g < G; ++g) {
      T* d = dst + (pl * G + g) * plane;
      if (g >= count || pd.h == 0) {
        fill_row(d, plane, T(0));
        continue;
      }
      const T* s = src + g * stride + pl * pd.h * pd.w;
      fill_row(d, pd.top * ld + pd.left, T(0));
      for (int64_t r = 0; r < pd.h; ++r) {
        // Row r's values, then zeros up to the next row's values (or to the end of the plane).
        T* row = d + (pd.top + r) * ld + pd.left;
        copy_row(s + r * pd.w, pd.w, row);
        const int64_t end = r + 1 < pd.h ? ld : plane - (pd.top + r) * ld - pd.left;
        fill_row(row + pd.w, end - pd.w, T(0));
      }
    }
  fill_row(dst + pd.planes * G * plane, pd.tail * ld + pd.slack, T(0));
}

// Samples per group. One sample's flat row (`row` = rows x padded width positions) of at least
// 4 vectors keeps the register tile busy enough; below that (VGG's 4x4 and 2x2 maps: 24 and 8
// positions) the per-weight overhead (broadcast, address) dominates, so groups of enough samples
// for a 256-float tile are formed, at the price of computing the padding rows between samples
// (VGG-11's 512->512 convs at density 0.08, forward + backward: 25.0 ms on 4x4 maps and 13.6 ms on
// 2x2 maps in `python -m bench --suites convalgo`, against 30 and 23 ms one sample at a time in a
// one-off comparison before this change). Depends on the shape only, never on the thread count.
int64_t group_size(int64_t N, int64_t row, int64_t plane) {
  if (row >= 64) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(N, (256 + plane - 1) / std::max<int64_t>(1, plane)));
}

// Slack after a padded buffer: reads reach `reach` elements past the last plane,
// and a masked vector load may touch up to one vector beyond.
int64_t slack_for(int64_t reach) { return reach + 64; }

// Width, vector count and last-vector lanes of the tile starting at nb of a row of length L.
struct TileShape {
  int nv, tail;
  bool partial;
};
template <int W>
inline TileShape tile_shape(int64_t L, int64_t nb, int64_t tile) {
  const int64_t tw = std::min<int64_t>(tile, L - nb);
  const int nv = static_cast<int>((tw + W - 1) / W);
  const int tail = static_cast<int>(tw - (nv - 1) * W);
  return {nv, tail, tail != W};
}

// Tile width (elements) of the shifted products: 8 vectors, half the linear SpMM's tile. A
// narrower tile keeps the input window of a channel block (below) small; 8 vectors are still
// enough independent FMA chains to hide the FMA latency (4 vectors measured the same, 2 slower).
template <typename T>
constexpr int64_t kConvTile = 8 * cpu::SpmmTuning<T>::W;

// Channel blocking. Every stored weight of a row reads one shifted input segment of the tile,
// and over all its rows a tile reads a window of (tile + reach) elements per input channel. For
// all channels at once that window (a 3x3 64-channel layer at 32x32: ~83 KB; 256 channels at
// 8x8: ~104 KB) does not fit L1, so each weight waited for its segment from L2 and the kernel ran
// at about a third of the FMA rate. The entries of each row are therefore grouped by blocks of
// input channels whose window fits kWindowBytes, and a tile runs block by block over all rows:
// the window of one block stays in L1 while every row uses it, at the price of storing and
// reloading each row's partial tile once per block it has entries in (from L1/L2, once per
// ~tens of weights). The summation order of a row is unchanged (its entries in order, the partial
// kept exactly), so results do not depend on the blocking. Measured (2 threads, Xeon, batch 64,
// float32, medians of 15, blocked vs unblocked in alternation): 3x3 256->256 at 8x8, density 0.1:
// forward 8.3 -> 5.8 ms, input gradient 7.6 -> 6.0, weight gradient 9.4 -> 7.8; 64->64 at 32x32:
// weight gradient 7.3 -> 6.2 ms at 0.1, 18.1 -> 14.4 at 0.3, the others within noise. A 24 KB
// window measured as well as 16 or 32 KB here and leaves room in a 32 KB L1.
constexpr int64_t kWindowBytes = 24 * 1024;

int64_t channels_per_block(int64_t tile, int64_t reach, int64_t elem_bytes) {
  return std::max<int64_t>(1, kWindowBytes / ((tile + reach) * elem_bytes));
}

// Entries of row r with channel block b are [at(r, b), at(r, b + 1)); at(r, 0) = rowptr[r] and
// at(r, nblk) = rowptr[r + 1].
struct ChannelBlocks {
  int64_t nblk = 1;
  std::vector<int64_t> start;  // [R * nblk + 1]
  int64_t at(int64_t r, int64_t b) const { return start[r * nblk + b]; }
};

// Groups each row's entries by channel block (block of an entry: addr / span, span = the
// address distance of `per_block` channels), stably; addr and, when given, w and pos are permuted
// alike. Rows already in block order (the forward's and weight gradient's, sorted by column) are
// left as they are.
template <typename T>
ChannelBlocks block_by_channel(const std::vector<int64_t>& rowptr, int64_t R, int64_t channels, int64_t per_block,
                               int64_t channel_stride, std::vector<int64_t>& addr, std::vector<T>* w,
                               std::vector<int64_t>* pos) {
  ChannelBlocks cb;
  cb.nblk = (channels + per_block - 1) / std::max<int64_t>(1, per_block);
  if (cb.nblk <= 1) {
    cb.nblk = 1;
    cb.start = rowptr;
    return cb;
  }
  const int64_t nblk = cb.nblk, span = per_block * channel_stride;
  const auto block_of = [&](int64_t e) { return std::min<int64_t>(nblk - 1, addr[e] / span); };
  cb.start.assign(R * nblk + 1, 0);
  bool ordered = true;
  for (int64_t r = 0; r < R; ++r) {
    int64_t* cnt = cb.start.data() + r * nblk;
    int64_t prev = 0;
    for (int64_t e = rowptr[r]; e < rowptr[r + 1]; ++e) {
      const int64_t b = block_of(e);
      ordered = ordered && b >= prev;
      prev = b;
      ++cnt[b];
    }
    int64_t at = rowptr[r];  // counts -> starts
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t c = cnt[b];
      cnt[b] = at;
      at += c;
    }
  }
  cb.start[R * nblk] = rowptr[R];
  if (ordered) return cb;
  std::vector<int64_t> cursor(cb.start.begin(), cb.start.end() - 1), order(addr.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t e = rowptr[r]; e < rowptr[r + 1]; ++e) order[cursor[r * nblk + block_of(e)]++] = e;
  const auto permute = [&](auto& v) {
    auto old = v;
    for (size_t i = 0; i < order.size(); ++i) v[i] = old[order[i]];
  };
  permute(addr);
  if (w) permute(*w);
  if (pos) permute(*pos);
  return cb;
}

// out[r - r0, q] = sum_{e in row r} w[e] * in[addr[e] + q] for r0 <= r < r1, q < L (out rows of length L),
// with the entries grouped by channel block as `cb` says (64-bit addresses, values in entry order).
// `touched` has room for r1 - r0 flags.
template <typename T>
void gathered_spmm(const T* in, const ChannelBlocks& cb, const int64_t* addr, const T* w, int64_t r0, int64_t r1,
                   int64_t L, T* out, char* touched) {
  constexpr int W = cpu::SpmmTuning<T>::W;
  constexpr int64_t kT = kConvTile<T>;
  // Tile-outer: the input window of one tile is reused by every row.
  for (int64_t nb = 0; nb < L; nb += kT) {
    const TileShape ts = tile_shape<W>(L, nb, kT);
    const auto fn = cpu::csr_tile_for<T, int64_t>(ts.nv, ts.partial);
    if (cb.nblk == 1) {
      for (int64_t r = r0; r < r1; ++r)
        fn(w + cb.at(r, 0), addr + cb.at(r, 0), cb.at(r, 1) - cb.at(r, 0), in + nb, 1, out + (r - r0) * L + nb,
           ts.tail, true, T(0));
      continue;
    }
    std::fill(touched, touched + (r1 - r0), 0);
    for (int64_t b = 0; b < cb.nblk; ++b)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e0 = cb.at(r, b), e1 = cb.at(r, b + 1);
        if (e0 == e1) continue;
        // The first block with entries starts the tile from zero, later ones continue its partial sum.
        fn(w + e0, addr + e0, e1 - e0, in + nb, 1, out + (r - r0) * L + nb, ts.tail, !touched[r - r0], T(0));
        touched[r - r0] = 1;
      }
    for (int64_t r = r0; r < r1; ++r)  // rows without entries: zeros
      if (!touched[r - r0]) fn(w, addr, 0, in + nb, 1, out + (r - r0) * L + nb, ts.tail, true, T(0));
  }
}

// out[g, r, h, :cols] = buf[r, g*plane + h*ld + c0 : ... + cols] for g < count, r < R, h < rows
// (out samples of stride out_stride holding planes of rows x cols; buf rows of length L).
// Plus bias[r] when `bias` is given (row r of the block is output channel r0 + r; `bias` points at
// the block's first channel).
template <typename T>
void crop_group(const T* buf, int64_t L, int64_t count, int64_t plane, int64_t R, int64_t rows, int64_t ld,
                int64_t c0, int64_t cols, int64_t out_stride, const T* bias, T* out) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < count; ++g)
      for (int64_t h = 0; h < rows; ++h) {
        const T* src = buf + r * L + g * plane + h * ld + c0;
        T* dst = out + g * out_stride + (r * rows + h) * cols;
        if (bias)
          copy_row_plus(src, cols, bias[r], dst);
        else
          copy_row(src, cols, dst);
      }
}

// Row blocks per sample so that there are at least ~4 tasks per thread when the batch is small
// (the split changes only who computes a row, not how: results do not depend on it).
int64_t row_blocks(int64_t N, int64_t rows) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(rows, (want + N - 1) / std::max<int64_t>(1, N)));
}

// The shared driver of forward and input gradient: for every group of G samples n0.., with in
// the group's planes of `raw` zero-padded as `pd` describes (layout of pad_group; `addr` is
// relative to it, so channel c starts at c * G * plane),
//   out[n0 + g, r, h, w] = sum_e w[e] * in[addr[e] + g*plane + h*ld + c0 + w]   (r < R, h < rows, w < cols)
// (+ bias[r] when bias is not null) computed as one flat product per output row over
// L = (G - 1) * plane + rows * ld positions (positions outside the valid rows and columns are
// computed and thrown away).
// `reach` is the largest offset of an entry's address within its channel (the kernel's extent).
template <typename T>
void shifted_conv(const T* raw, const Pad& pd, int64_t G, const std::vector<int64_t>& rowptr,
                  std::vector<int64_t>& addr, std::vector<T>& w, int64_t N, int64_t R, int64_t rows, int64_t ld,
                  int64_t c0, int64_t cols, int64_t reach, const T* bias, T* out) {
  const int64_t plane = pd.plane(), L = (G - 1) * plane + rows * ld, groups = (N + G - 1) / G;
  const int64_t RB = row_blocks(groups, R), per = (R + RB - 1) / RB;
  const ChannelBlocks cb = block_by_channel<T>(
      rowptr, R, pd.planes, channels_per_block(std::min(L, kConvTile<T>), reach, sizeof(T)), G * plane, addr, &w,
      nullptr);
  at::parallel_for(0, groups * RB, 1, [&](int64_t t0, int64_t t1) {
    std::vector<char> touched(static_cast<size_t>(std::min(per, R)));
    // Both are written in full before they are read (pad_group fills every position, the first
    // tile of each row overwrites), so they need no zeroing.
    const at::Tensor buf_block = cpu::pooled_scratch<T>(std::min(per, R) * L);
    const at::Tensor in_block = cpu::pooled_scratch<T>(pd.size(G));
    T* const buf = buf_block.data_ptr<T>();
    T* const in = in_block.data_ptr<T>();
    int64_t padded = -1;  // the group now in `in` (consecutive tasks often share it)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t grp = t / RB, ra = (t % RB) * per, rb = std::min(R, ra + per);
      if (ra >= rb) continue;
      const int64_t n0 = grp * G, count = std::min(G, N - n0);
      if (grp != padded) {
        pad_group<T>(raw + n0 * pd.src_size(), pd.src_size(), count, G, pd, in);
        padded = grp;
      }
      gathered_spmm<T>(in, cb, addr.data(), w.data(), ra, rb, L, buf, touched.data());
      crop_group<T>(buf, L, count, plane, rb - ra, rows, ld, c0, cols, R * rows * cols, bias ? bias + ra : nullptr,
                    out + (n0 * R + ra) * rows * cols);
    }
  });
}

template <typename index_t, typename scalar_t, typename F>
void entry_lists(const index_t* P, const index_t* S, const scalar_t* V, int64_t R, F&& address,
                 std::vector<int64_t>& rowptr, std::vector<int64_t>& addr, std::vector<scalar_t>& w) {
  const int64_t base = P[0], nnz = P[R] - P[0];
  rowptr.resize(R + 1);
  addr.resize(nnz);
  w.resize(nnz);
  for (int64_t r = 0; r <= R; ++r) rowptr[r] = P[r] - base;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t e = P[r]; e < P[r + 1]; ++e) {
      addr[e - base] = address(r, e);
      w[e - base] = V[S[e]];
    }
}

at::Tensor conv2d_forward_cpu(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                              const at::Tensor& slot, const at::Tensor& x_in, at::IntArrayRef kernel,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              const std::optional<at::Tensor>& bias_in) {
  const Geometry g = geometry(kernel, padding, dilation);
  TORCH_CHECK_VALUE(values.dim() == 1, "sparsestart.conv2d: direct convolution needs a CSR weight (values [C])");
  TORCH_CHECK_VALUE(x_in.dim() == 4, "sparsestart.conv2d: x must be [N, Cin, H, W], got ", x_in.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x_in.scalar_type(), "sparsestart.conv2d: values dtype ",
                   values.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  const int64_t N = x_in.size(0), Cin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = ptr.numel() - 1, KK = g.KH * g.KW;
  const int64_t Ho = H + 2 * g.ph - g.dh * (g.KH - 1), Wo = W + 2 * g.pw - g.dw * (g.KW - 1);
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "sparsestart.conv2d: input ", H, "x", W, " is smaller than the dilated kernel");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == M, "sparsestart.conv2d: bias must be [", M,
                      "] (one per output channel), got ", bias_in->sizes());
    TORCH_CHECK_TYPE(bias_in->scalar_type() == x_in.scalar_type(), "sparsestart.conv2d: bias dtype ",
                     bias_in->scalar_type(), " differs from x dtype ", x_in.scalar_type());
  }
  auto out = cpu::pooled_empty({N, M, Ho, Wo}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const Pad pd = shared_pad(Cin, H, W, g.ph, g.pw, Ho, Wo, slack_for((g.KW - 1) * g.dw));
  const int64_t ld = pd.ld, plane = pd.plane();
  const int64_t G = group_size(N, Ho * ld, plane);
  auto x = x_in.contiguous();
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  auto vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "sparsestart_conv2d_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_conv2d_cpu_index", [&] {
      const index_t* I = ix.data_ptr<index_t>();
      std::vector<int64_t> rowptr, addr;
      std::vector<scalar_t> w;
      entry_lists(p.data_ptr<index_t>(), sl.data_ptr<index_t>(), vals.data_ptr<scalar_t>(), M,
                  [&](int64_t, int64_t e) {
                    const int64_t c = I[e], ci = c / KK, kh = (c % KK) / g.KW, kw = c % g.KW;
                    return ci * G * plane + kh * g.dh * ld + kw * g.dw;
                  },
                  rowptr, addr, w);
      shifted_conv<scalar_t>(x.data_ptr<scalar_t>(), pd, G, rowptr, addr, w, N, M, Ho, ld, 0, Wo,
                             (g.KH - 1) * g.dh * ld + (g.KW - 1) * g.dw, has_bias ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor conv2d_input_grad_cpu(const at::Tensor& values, const at::Tensor& colptr, const at::Tensor& row,
                                 const at::Tensor& slot_t, const at::Tensor& dy_in, at::IntArrayRef kernel,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = geometry(kernel, padding, dilation);
  TORCH_CHECK_VALUE(values.dim() == 1, "sparsestart.conv2d: direct convolution needs a CSR weight (values [C])");
  TORCH_CHECK_VALUE(dy_in.dim() == 4, "sparsestart.conv2d: dy must be [N, Cout, Ho, Wo], got ", dy_in.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == dy_in.scalar_type(), "sparsestart.conv2d: values dtype ",
                   values.scalar_type(), " differs from dy dtype ", dy_in.scalar_type());
  const int64_t KK = g.KH * g.KW;
  TORCH_CHECK_VALUE((colptr.numel() - 1) % KK == 0, "sparsestart.conv2d: colptr has ", colptr.numel() - 1,
                    " columns, not a multiple of the kernel size ", KK);
  const int64_t N = dy_in.size(0), M = dy_in.size(1), Ho = dy_in.size(2), Wo = dy_in.size(3);
  const int64_t Cin = (colptr.numel() - 1) / KK;
  const int64_t H = Ho + g.dh * (g.KH - 1) - 2 * g.ph, W = Wo + g.dw * (g.KW - 1) - 2 * g.pw;
  TORCH_CHECK_VALUE(H > 0 && W > 0, "sparsestart.conv2d: padding too large for this output size");
  auto dx = cpu::pooled_empty({N, Cin, H, W}, dy_in.options());
  if (dx.numel() == 0) return dx;
  // dx[h][w] = sum over (co, kh, kw) of v * dy[h + ph - kh*dh][w + pw - kw*dw] (zero outside dy).
  // Pad dy by `top` rows so the smallest row index, ph - dh*(KH-1), lands at >= 0; the largest,
  // H - 1 + ph, then needs the same margin below (likewise for columns). Over the flat axis
  // q = h*Wq + w the read for entry (co, kh, kw) is at co*plane + (ph + top - kh*dh)*Wq +
  // (pw + left - kw*dw) + q, reaching pw + left past the last plane.
  const int64_t top = std::max<int64_t>(0, g.dh * (g.KH - 1) - g.ph);
  const int64_t left = std::max<int64_t>(0, g.dw * (g.KW - 1) - g.pw);
  const Pad pd = shared_pad(M, Ho, Wo, top, left, H, W, slack_for(g.pw + left));
  const int64_t Wq = pd.ld, plane = pd.plane();
  const int64_t G = group_size(N, H * Wq, plane);
  auto dy = dy_in.contiguous();
  auto p = colptr.contiguous(), ix = row.contiguous(), sl = slot_t.contiguous();
  auto vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dy_in.scalar_type(), "sparsestart_conv2d_input_grad_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_conv2d_input_grad_cpu_index", [&] {
      const index_t* P = p.data_ptr<index_t>();
      const index_t* I = ix.data_ptr<index_t>();
      // Rows of the gathered product are input channels: the CSC columns ci*KK .. ci*KK + KK - 1
      // are consecutive, so channel ci's entries are one contiguous range of the CSC arrays.
      std::vector<index_t> chan_ptr(Cin + 1);
      for (int64_t ci = 0; ci <= Cin; ++ci) chan_ptr[ci] = P[ci * KK];
      std::vector<int64_t> rowptr, addr;
      std::vector<scalar_t> w;
      int64_t c = 0;  // column of the current entry (entries are visited in order)
      entry_lists(chan_ptr.data(), sl.data_ptr<index_t>(), vals.data_ptr<scalar_t>(), Cin,
                  [&](int64_t, int64_t e) {
                    while (P[c + 1] <= e) ++c;
                    const int64_t k = c % KK, kh = k / g.KW, kw = k % g.KW;
                    return static_cast<int64_t>(I[e]) * G * plane + (g.ph + top - kh * g.dh) * Wq + g.pw + left -
                           kw * g.dw;
                  },
                  rowptr, addr, w);
      shifted_conv<scalar_t>(dy.data_ptr<scalar_t>(), pd, G, rowptr, addr, w, N, Cin, H, Wq, 0, W,
                             (g.KH - 1) * g.dh * Wq + (g.KW - 1) * g.dw, nullptr,
                             dx.data_ptr<scalar_t>());
    });
  });
  return dx;
}

// Value gradient: dV[e] = sum_n sum_q dyw[n, co, q] * xp[n, addr_e + q] over the flat axis
// q = h*Wp + w of the padded input's plane, with dy widened to the padded plane by zero rows and
// columns (so the thrown-away positions contribute nothing); G samples at a time in the group
// layout of pad_group, as in the forward. Samples are cut into a fixed number of chunks
// (independent of the thread count); each chunk sums into its own partial vector with the
// SDDMM tile kernel (a dy tile in registers, 8 shifted x rows per pass) and the partials
// are added in chunk order: deterministic for any thread count. Each tile runs channel block by
// channel block over the rows (see ChannelBlocks; `reach` as in shifted_conv): every entry is
// still summed over the tiles in order, so the blocking does not change results.
template <typename T>
void weight_grad_kernel(const T* dy, const Pad& dy_pad, const T* x, const Pad& x_pad, int64_t G,
                        const std::vector<int64_t>& rowptr, std::vector<int64_t>& addr, int64_t reach, int64_t N,
                        int64_t M, int64_t per, int64_t chunks, T* partial) {
  using Tu = cpu::SddmmTuning<T>;
  constexpr int W = Tu::W;
  const int64_t nnz = rowptr[M], plane = x_pad.plane();
  const int64_t L = (G - 1) * plane + dy_pad.h * x_pad.ld;
  std::vector<int64_t> local(static_cast<size_t>(nnz));
  for (int64_t e = 0; e < nnz; ++e) local[e] = e;
  const ChannelBlocks cb = block_by_channel<T>(rowptr, M, x_pad.planes,
                                               channels_per_block(std::min(L, Tu::kTile), reach, sizeof(T)),
                                               G * plane, addr, nullptr, &local);
  const int64_t RB = row_blocks(chunks, M), rper = (M + RB - 1) / RB;
  const int64_t dy_sample = M * dy_pad.h * dy_pad.w;  // one sample of dy, unpadded
  at::parallel_for(0, chunks * RB, 1, [&](int64_t t0, int64_t t1) {
    // Per-thread padded copies of one group: its input, and its output gradient rows ra..rb.
    // (pad_group writes every position that is read: no zeroing.)
    const at::Tensor xs_block = cpu::pooled_scratch<T>(x_pad.size(G));
    Pad rows_pad = dy_pad;
    rows_pad.planes = std::min(rper, M);
    const at::Tensor ds_block = cpu::pooled_scratch<T>(rows_pad.size(G));
    T* const xs = xs_block.data_ptr<T>();
    T* const ds = ds_block.data_ptr<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ch = t / RB, ra = (t % RB) * rper, rb = std::min(M, ra + rper);
      if (ra >= rb) continue;
      T* part = partial + ch * nnz;
      rows_pad.planes = rb - ra;
      const int64_t end = std::min(N, (ch + 1) * per);
      for (int64_t n0 = ch * per; n0 < end; n0 += G) {
        const int64_t count = std::min(G, end - n0);
        pad_group<T>(x + n0 * x_pad.src_size(), x_pad.src_size(), count, G, x_pad, xs);
        pad_group<T>(dy + n0 * dy_sample + ra * dy_pad.h * dy_pad.w, dy_sample, count, G, rows_pad, ds);
        for (int64_t nb = 0; nb < L; nb += Tu::kTile) {
          const TileShape ts = tile_shape<W>(L, nb, Tu::kTile);
          const auto fn = cpu::sddmm_tile_for<T, int64_t>(ts.nv, ts.partial);
          for (int64_t b = 0; b < cb.nblk; ++b)
            for (int64_t r = ra; r < rb; ++r)
              if (cb.at(r, b) < cb.at(r, b + 1))
                fn(ds + (r - ra) * G * plane + nb, addr.data(), local.data(), cb.at(r, b), cb.at(r, b + 1), xs + nb,
                   1, part, ts.tail);
        }
      }
    }
  });
}

at::Tensor conv2d_weight_grad_cpu(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot,
                                  const at::Tensor& dy_in, const at::Tensor& x_in, int64_t capacity,
                                  at::IntArrayRef kernel, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = geometry(kernel, padding, dilation);
  TORCH_CHECK_VALUE(dy_in.dim() == 4 && x_in.dim() == 4 && dy_in.size(0) == x_in.size(0),
                    "sparsestart.conv2d: dy [N, Cout, Ho, Wo] and x [N, Cin, H, W] must share N, got ",
                    dy_in.sizes(), " and ", x_in.sizes());
  TORCH_CHECK_TYPE(dy_in.scalar_type() == x_in.scalar_type(), "sparsestart.conv2d: dy dtype ", dy_in.scalar_type(),
                   " differs from x dtype ", x_in.scalar_type());
  const int64_t N = x_in.size(0), Cin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = ptr.numel() - 1, Ho = dy_in.size(2), Wo = dy_in.size(3), KK = g.KH * g.KW;
  TORCH_CHECK_VALUE(Ho == H + 2 * g.ph - g.dh * (g.KH - 1) && Wo == W + 2 * g.pw - g.dw * (g.KW - 1),
                    "sparsestart.conv2d: dy spatial size ", Ho, "x", Wo, " does not match x ", H, "x", W,
                    " under this geometry");
  auto out = cpu::pooled_zeros({capacity}, dy_in.options());
  if (N == 0 || M == 0) return out;
  const Pad x_pad = shared_pad(Cin, H, W, g.ph, g.pw, Ho, Wo, slack_for((g.KW - 1) * g.dw));
  const int64_t Wp = x_pad.ld, plane = x_pad.plane();
  // dy at the positions of the outputs in x's layout: rows Wp apart, planes of x's plane apart.
  const Pad dy_pad{M, Ho, Wo, 0, 0, Wp, x_pad.rows, 0, 0};
  auto x = x_in.contiguous(), dy = dy_in.contiguous();
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  // A fixed number of sample chunks (at most 16, each a multiple of the group size but the
  // last): enough parallel work, bounded partial-sum memory, independent of the thread count.
  const int64_t G = group_size(N, Ho * Wp, plane);
  const int64_t per = std::max<int64_t>((N + 15) / 16 + G - 1, G) / G * G, chunks = (N + per - 1) / per;
  AT_DISPATCH_FLOATING_TYPES(dy_in.scalar_type(), "sparsestart_conv2d_weight_grad_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_conv2d_weight_grad_cpu_index", [&] {
      const index_t* P = p.data_ptr<index_t>();
      const index_t* I = ix.data_ptr<index_t>();
      const index_t* S = sl.data_ptr<index_t>();
      const int64_t base = P[0], nnz = P[M] - base;
      std::vector<int64_t> rowptr(M + 1), addr(nnz);
      for (int64_t r = 0; r <= M; ++r) rowptr[r] = P[r] - base;
      for (int64_t e = 0; e < nnz; ++e) {
        const int64_t c = I[base + e], ci = c / KK, kh = (c % KK) / g.KW, kw = c % g.KW;
        addr[e] = ci * G * plane + kh * g.dh * Wp + kw * g.dw;
      }
      const at::Tensor partial_block = cpu::pooled_scratch<scalar_t>(chunks * nnz, /*zeroed=*/true);
      const scalar_t* const partial = partial_block.data_ptr<scalar_t>();
      weight_grad_kernel<scalar_t>(dy.data_ptr<scalar_t>(), dy_pad, x.data_ptr<scalar_t>(), x_pad, G, rowptr, addr,
                                   (g.KH - 1) * g.dh * Wp + (g.KW - 1) * g.dw, N, M, per, chunks,
                                   partial_block.data_ptr<scalar_t>());
      scalar_t* O = out.data_ptr<scalar_t>();
      at::parallel_for(0, nnz, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          scalar_t s = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) s += partial[ch * nnz + e];
          O[S[base + e]] = s;
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsestart, CPU, m) {
  m.impl("_native_conv2d", &conv2d_forward_cpu);
  m.impl("_native_conv2d_input_grad", &conv2d_input_grad_cpu);
  m.impl("_native_conv2d_weight_grad", &conv2d_weight_grad_cpu);
}

}  // namespace sparsestart
