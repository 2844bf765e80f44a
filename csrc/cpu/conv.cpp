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
//   out: y [N, Cout, Ho, Wo], dx [N, Cin, H, W], dV [C] (zero in free slots)
// with Ho = H + 2*ph - dh*(KH-1), Wo = W + 2*pw - dw*(KW-1).
//
// Forward and input gradient are the same computation: an output plane tile is a
// weighted sum of shifted windows of input planes, out[r][j] += v * in[base_e + r*ld + j].
// Inputs are first copied into zero-padded planes with margins, so every tile reads
// in bounds with no per-element checks; each task (sample, output plane) has one
// writer, so no atomics and results are deterministic. The tile (ROWS x TW floats)
// lives in registers for the whole entry loop; TW is a compile-time constant so the
// compiler vectorises the j loop with the host's widest SIMD.
// The weight gradient is, per stored entry, the dot product of dy[:, co] with the
// matching shifted window of x[:, ci]; entries are taken four at a time so each dy
// vector load feeds four accumulators.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Copy planes [P, h, w] into zero planes [P, h + top + bottom, w + left + right] at (top, left),
// in one pass per plane (zeroing strided margins through TensorIterator is far slower).
template <typename scalar_t>
void pad_planes_kernel(const scalar_t* src, scalar_t* dst, int64_t planes, int64_t h, int64_t w, int64_t top,
                       int64_t bottom, int64_t left, int64_t right) {
  const int64_t W2 = w + left + right, H2 = h + top + bottom;
  at::parallel_for(0, planes, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t pl = p0; pl < p1; ++pl) {
      scalar_t* d = dst + pl * H2 * W2;
      const scalar_t* s = src + pl * h * w;
      std::fill(d, d + top * W2, scalar_t(0));
      for (int64_t r = 0; r < h; ++r) {
        scalar_t* row = d + (top + r) * W2;
        std::fill(row, row + left, scalar_t(0));
        std::copy(s + r * w, s + (r + 1) * w, row + left);
        std::fill(row + left + w, row + W2, scalar_t(0));
      }
      std::fill(d + (top + h) * W2, d + H2 * W2, scalar_t(0));
    }
  });
}

at::Tensor pad_planes(const at::Tensor& t, int64_t top, int64_t bottom, int64_t left, int64_t right) {
  if (top == 0 && bottom == 0 && left == 0 && right == 0) return t;
  auto sizes = t.sizes().vec();
  const int64_t h = sizes[sizes.size() - 2], w = sizes[sizes.size() - 1];
  const int64_t planes = h * w ? t.numel() / (h * w) : 0;
  sizes[sizes.size() - 2] = h + top + bottom;
  sizes[sizes.size() - 1] = w + left + right;
  auto out = at::empty(sizes, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "sparsestart_pad_planes", [&] {
    pad_planes_kernel<scalar_t>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), planes, h, w, top, bottom, left,
                                right);
  });
  return out;
}

// One output tile: out[r*ldo + j] = sum_e v[e] * in[base[e] + r*ldi + j] for r < rn, j < cn.
// FULL tiles have rn = ROWS and cn = TW known at compile time, so the accumulators stay in
// vector registers; edge tiles use the same code with run-time bounds.
template <typename scalar_t, int ROWS, int TW, bool FULL>
inline void tile(const scalar_t* in, const int64_t* base, const scalar_t* v, int64_t ne, int64_t ldi,
                 scalar_t* out, int64_t ldo, int64_t rn, int64_t cn) {
  if (FULL) {
    rn = ROWS;
    cn = TW;
  }
  scalar_t acc[ROWS][TW] = {};
  for (int64_t e = 0; e < ne; ++e) {
    const scalar_t w = v[e];
    const scalar_t* p = in + base[e];
    for (int64_t r = 0; r < rn; ++r)
      for (int64_t j = 0; j < cn; ++j) acc[r][j] += w * p[r * ldi + j];
  }
  for (int64_t r = 0; r < rn; ++r)
    for (int64_t j = 0; j < cn; ++j) out[r * ldo + j] = acc[r][j];
}

// A whole output plane [rows, cols] (leading dimension cols) from shifted windows of `in`.
template <typename scalar_t, int ROWS, int TW>
void gather_tiles(const scalar_t* in, const int64_t* base, const scalar_t* v, int64_t ne, int64_t ldi,
                  scalar_t* out, int64_t rows, int64_t cols) {
  int64_t r0 = 0;
  for (; r0 + ROWS <= rows; r0 += ROWS) {
    int64_t c0 = 0;
    for (; c0 + TW <= cols; c0 += TW)
      tile<scalar_t, ROWS, TW, true>(in + r0 * ldi + c0, base, v, ne, ldi, out + r0 * cols + c0, cols, ROWS, TW);
    if (c0 < cols)
      tile<scalar_t, ROWS, TW, false>(in + r0 * ldi + c0, base, v, ne, ldi, out + r0 * cols + c0, cols, ROWS,
                                      cols - c0);
  }
  for (; r0 < rows; ++r0) {  // leftover rows, one at a time
    int64_t c0 = 0;
    for (; c0 + TW <= cols; c0 += TW)
      tile<scalar_t, 1, TW, true>(in + r0 * ldi + c0, base, v, ne, ldi, out + r0 * cols + c0, cols, 1, TW);
    if (c0 < cols)
      tile<scalar_t, 1, TW, false>(in + r0 * ldi + c0, base, v, ne, ldi, out + r0 * cols + c0, cols, 1, cols - c0);
  }
}

template <typename scalar_t>
void gather_plane(const scalar_t* in, const std::vector<int64_t>& base, const std::vector<scalar_t>& v, int64_t ldi,
                  scalar_t* out, int64_t rows, int64_t cols) {
  const int64_t ne = static_cast<int64_t>(base.size());
  // Narrow planes (8x8 feature maps) use 8-wide tiles of 8 rows; wider ones 16-wide tiles of 4 rows.
  if (cols <= 8)
    gather_tiles<scalar_t, 8, 8>(in, base.data(), v.data(), ne, ldi, out, rows, cols);
  else
    gather_tiles<scalar_t, 4, 16>(in, base.data(), v.data(), ne, ldi, out, rows, cols);
}

at::Tensor conv2d_forward_cpu(const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                              const at::Tensor& slot, const at::Tensor& x_in, at::IntArrayRef kernel,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = geometry(kernel, padding, dilation);
  TORCH_CHECK_VALUE(values.dim() == 1, "sparsestart.conv2d: direct convolution needs a CSR weight (values [C])");
  TORCH_CHECK_VALUE(x_in.dim() == 4, "sparsestart.conv2d: x must be [N, Cin, H, W], got ", x_in.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x_in.scalar_type(), "sparsestart.conv2d: values dtype ",
                   values.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  const int64_t N = x_in.size(0), Cin = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = ptr.numel() - 1, KK = g.KH * g.KW;
  const int64_t Ho = H + 2 * g.ph - g.dh * (g.KH - 1), Wo = W + 2 * g.pw - g.dw * (g.KW - 1);
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "sparsestart.conv2d: input ", H, "x", W, " is smaller than the dilated kernel");
  auto out = at::empty({N, M, Ho, Wo}, x_in.options());
  if (out.numel() == 0) return out;
  // Zero-padded input: every tile then reads in bounds without per-element checks.
  auto xp = pad_planes(x_in.contiguous(), g.ph, g.ph, g.pw, g.pw);
  const int64_t Hp = xp.size(2), Wp = xp.size(3);
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  auto vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "sparsestart_conv2d_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_conv2d_cpu_index", [&] {
      const index_t* P = p.data_ptr<index_t>();
      const index_t* I = ix.data_ptr<index_t>();
      const index_t* S = sl.data_ptr<index_t>();
      const scalar_t* V = vals.data_ptr<scalar_t>();
      const scalar_t* X = xp.data_ptr<scalar_t>();
      scalar_t* Y = out.data_ptr<scalar_t>();
      // Tasks are (sample, output channel); consecutive tasks share the sample, so
      // its padded input stays in cache while its output channels are computed.
      at::parallel_for(0, N * M, 1, [&](int64_t t0, int64_t t1) {
        std::vector<int64_t> base;
        std::vector<scalar_t> v;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / M, co = t % M;
          base.clear();
          v.clear();
          for (int64_t e = P[co]; e < P[co + 1]; ++e) {
            const int64_t c = I[e], ci = c / KK, kh = (c % KK) / g.KW, kw = c % g.KW;
            base.push_back((ci * Hp + kh * g.dh) * Wp + kw * g.dw);
            v.push_back(V[S[e]]);
          }
          gather_plane<scalar_t>(X + n * Cin * Hp * Wp, base, v, Wp, Y + (n * M + co) * Ho * Wo, Ho, Wo);
        }
      });
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
  auto dx = at::empty({N, Cin, H, W}, dy_in.options());
  if (dx.numel() == 0) return dx;
  // dx[i][j] = sum over (co, kh, kw) of v * dy[i + ph - kh*dh][j + pw - kw*dw] (zero outside dy):
  // pad dy so that the smallest index, ph - dh*(KH-1), lands at row >= 0.
  const int64_t top = std::max<int64_t>(0, g.dh * (g.KH - 1) - g.ph);
  const int64_t left = std::max<int64_t>(0, g.dw * (g.KW - 1) - g.pw);
  // The largest index read is H - 1 + ph (kh = 0), i.e. Ho - 1 + (dh*(KH-1) - ph): the same margin below.
  const int64_t bottom = top, right = left;
  auto dyp = pad_planes(dy_in.contiguous(), top, bottom, left, right);
  const int64_t Hd = dyp.size(2), Wd = dyp.size(3);
  auto p = colptr.contiguous(), ix = row.contiguous(), sl = slot_t.contiguous();
  auto vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dy_in.scalar_type(), "sparsestart_conv2d_input_grad_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_conv2d_input_grad_cpu_index", [&] {
      const index_t* P = p.data_ptr<index_t>();
      const index_t* I = ix.data_ptr<index_t>();
      const index_t* S = sl.data_ptr<index_t>();
      const scalar_t* V = vals.data_ptr<scalar_t>();
      const scalar_t* D = dyp.data_ptr<scalar_t>();
      scalar_t* DX = dx.data_ptr<scalar_t>();
      at::parallel_for(0, N * Cin, 1, [&](int64_t t0, int64_t t1) {
        std::vector<int64_t> base;
        std::vector<scalar_t> v;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / Cin, ci = t % Cin;
          base.clear();
          v.clear();
          for (int64_t r = 0; r < KK; ++r) {
            const int64_t c = ci * KK + r, kh = r / g.KW, kw = r % g.KW;
            const int64_t roff = top + g.ph - kh * g.dh, coff = left + g.pw - kw * g.dw;
            for (int64_t e = P[c]; e < P[c + 1]; ++e) {
              base.push_back((static_cast<int64_t>(I[e]) * Hd + roff) * Wd + coff);
              v.push_back(V[S[e]]);
            }
          }
          gather_plane<scalar_t>(D + n * M * Hd * Wd, base, v, Wd, DX + (n * Cin + ci) * H * W, H, W);
        }
      });
    });
  });
  return dx;
}

// Value gradient: for each stored entry (co; ci, kh, kw), the dot product of dy[:, co] with
// the window of the padded x[:, ci] shifted by (kh*dh, kw*dw). Four entries at a time share
// each dy load; samples are processed in cache-sized chunks and partial sums added to the
// slot in a fixed order (one writer per slot: deterministic).
template <typename scalar_t, typename index_t>
void weight_grad_kernel(const index_t* P, const index_t* I, const index_t* S, const scalar_t* D, const scalar_t* X,
                        scalar_t* O, const Geometry& g, int64_t N, int64_t M, int64_t Cin, int64_t Ho, int64_t Wo,
                        int64_t Hp, int64_t Wp, int64_t chunk) {
  constexpr int TW = 16;
  const int64_t KK = g.KH * g.KW;
  const int64_t Wfull = Wo / TW * TW;
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n1 = std::min(N, n0 + chunk);
      for (int64_t co = r0; co < r1; ++co) {
        for (int64_t e0 = P[co]; e0 < P[co + 1]; e0 += 4) {
          const int ne = static_cast<int>(std::min<int64_t>(4, P[co + 1] - e0));
          int64_t base[4];
          for (int k = 0; k < 4; ++k) {
            const int64_t c = I[e0 + std::min(k, ne - 1)], ci = c / KK, kh = (c % KK) / g.KW, kw = c % g.KW;
            base[k] = (ci * Hp + kh * g.dh) * Wp + kw * g.dw;
          }
          scalar_t acc[4][TW] = {};
          scalar_t tail[4] = {};
          for (int64_t n = n0; n < n1; ++n) {
            const scalar_t* dyn = D + (n * M + co) * Ho * Wo;
            const scalar_t* xn = X + n * Cin * Hp * Wp;
            for (int64_t oh = 0; oh < Ho; ++oh) {
              const scalar_t* d = dyn + oh * Wo;
              for (int64_t c0 = 0; c0 < Wfull; c0 += TW) {
                for (int k = 0; k < 4; ++k) {
                  const scalar_t* xr = xn + base[k] + oh * Wp + c0;
                  for (int j = 0; j < TW; ++j) acc[k][j] += d[c0 + j] * xr[j];
                }
              }
              for (int k = 0; k < 4; ++k) {
                const scalar_t* xr = xn + base[k] + oh * Wp;
                for (int64_t j = Wfull; j < Wo; ++j) tail[k] += d[j] * xr[j];
              }
            }
          }
          for (int k = 0; k < ne; ++k) {
            scalar_t sum = tail[k];
            for (int j = 0; j < TW; ++j) sum += acc[k][j];
            O[S[e0 + k]] += sum;
          }
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
  const int64_t N = x_in.size(0), H = x_in.size(2), W = x_in.size(3);
  const int64_t M = ptr.numel() - 1, Ho = dy_in.size(2), Wo = dy_in.size(3);
  TORCH_CHECK_VALUE(Ho == H + 2 * g.ph - g.dh * (g.KH - 1) && Wo == W + 2 * g.pw - g.dw * (g.KW - 1),
                    "sparsestart.conv2d: dy spatial size ", Ho, "x", Wo, " does not match x ", H, "x", W,
                    " under this geometry");
  auto out = at::zeros({capacity}, dy_in.options());
  if (N == 0 || M == 0) return out;
  auto dy = dy_in.contiguous();
  auto xp = pad_planes(x_in.contiguous(), g.ph, g.ph, g.pw, g.pw);
  const int64_t Cin = x_in.size(1), Hp = xp.size(2), Wp = xp.size(3);
  // Samples are taken in chunks whose padded input (~512 KB) stays in cache while every
  // output channel's entries sweep over it; streaming all of x once per output channel
  // would make the gradient memory-bound.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(512) << 10) / std::max<int64_t>(1, Cin * Hp * Wp * 4));
  auto p = ptr.contiguous(), ix = idx.contiguous(), sl = slot.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dy_in.scalar_type(), "sparsestart_conv2d_weight_grad_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "sparsestart_conv2d_weight_grad_cpu_index", [&] {
      weight_grad_kernel<scalar_t, index_t>(p.data_ptr<index_t>(), ix.data_ptr<index_t>(), sl.data_ptr<index_t>(),
                                            dy.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                            g, N, M, Cin, Ho, Wo, Hp, Wp, chunk);
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
