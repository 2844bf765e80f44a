// Minimal SIMD layer for the CPU kernels: one vector type per scalar type,
// chosen at compile time.
//
//   __AVX512F__  -> 512-bit registers (16 floats / 8 doubles), masked tails
//   __AVX2__     -> 256-bit registers (8 floats / 4 doubles), maskload tails
//                   (needs __FMA__ too, which every AVX2 CPU has)
//   otherwise    -> one scalar per "vector" (portable build)
//
// Buffers: none of its own; every function reads or writes `n <= W`
// consecutive elements at the pointer it is given (`load_n`/`store_n` never
// touch memory past element n-1, so row tails need no padding).
//
// Why a layer of our own and not at::vec::Vectorized: the kernels need masked
// partial loads/stores for the N tail, embedded-broadcast FMAs and a
// deterministic horizontal sum, and they are written once against this small
// interface for all three instruction sets. Every multiply-add goes through
// `fma` so the scalar tail and the vector body round identically (which keeps
// results independent of where a thread's N range starts).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sparsestart {
namespace simd {

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "scalar";
#endif

// unroll<N>(f) calls f(std::integral_constant<int, 0>{}) ... f(<N - 1>) inline.
//
// Why: register tiles are arrays of vectors (acc[RB * NV]). GCC keeps such an
// array in registers only if every access has a constant index when scalar
// replacement runs; loops unrolled by `#pragma GCC unroll` are unrolled too
// late and the tile was stored to the stack on every iteration (measured: 3x
// slower BSR kernels). Expanding the loops at the template level gives
// constant indices from the start.
template <typename F, int... Is>
__attribute__((always_inline)) inline void unroll_impl(F&& f, std::integer_sequence<int, Is...>) {
  (f(std::integral_constant<int, Is>{}), ...);
}
template <int N, typename F>
__attribute__((always_inline)) inline void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

inline void prefetch(const void* p) {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Into L2 only: used for gathered input rows fetched several entries ahead,
// which would otherwise evict the accumulating tile's neighbours from L1.
inline void prefetch_l2(const void* p) {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

template <typename T>
struct Vec;

#if defined(__AVX512F__)

template <>
struct Vec<float> {
  using reg = __m512;
  static constexpr int W = 16;
  static inline __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float v) { return _mm512_set1_ps(v); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline void store_n(float* p, reg v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline float sum(reg v) {
    // Fixed pairwise order (halves, then quarters, ...) -> deterministic.
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
};

template <>
struct Vec<double> {
  using reg = __m512d;
  static constexpr int W = 8;
  static inline __mmask8 mask(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static inline reg zero() { return _mm512_setzero_pd(); }
  static inline reg set1(double v) { return _mm512_set1_pd(v); }
  static inline reg load(const double* p) { return _mm512_loadu_pd(p); }
  static inline reg load_n(const double* p, int n) { return _mm512_maskz_loadu_pd(mask(n), p); }
  static inline void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static inline void store_n(double* p, reg v, int n) { _mm512_mask_storeu_pd(p, mask(n), v); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static inline double sum(reg v) {
    __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    q = _mm_add_sd(q, _mm_unpackhi_pd(q, q));
    return _mm_cvtsd_f64(q);
  }
};

#elif defined(__AVX2__) && defined(__FMA__)

template <>
struct Vec<float> {
  using reg = __m256;
  static constexpr int W = 8;
  static inline __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float v) { return _mm256_set1_ps(v); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static inline void store_n(float* p, reg v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline float sum(reg v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
};

template <>
struct Vec<double> {
  using reg = __m256d;
  static constexpr int W = 4;
  static inline __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static inline reg zero() { return _mm256_setzero_pd(); }
  static inline reg set1(double v) { return _mm256_set1_pd(v); }
  static inline reg load(const double* p) { return _mm256_loadu_pd(p); }
  static inline reg load_n(const double* p, int n) { return _mm256_maskload_pd(p, mask(n)); }
  static inline void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static inline void store_n(double* p, reg v, int n) { _mm256_maskstore_pd(p, mask(n), v); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static inline double sum(reg v) {
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    q = _mm_add_sd(q, _mm_unpackhi_pd(q, q));
    return _mm_cvtsd_f64(q);
  }
};

#endif

// Scalar fallback, and the type used for the tails of the scalar paths.
template <typename T>
struct Scalar {
  using reg = T;
  static constexpr int W = 1;
  static inline reg zero() { return T(0); }
  static inline reg set1(T v) { return v; }
  static inline reg load(const T* p) { return *p; }
  static inline reg load_n(const T* p, int n) { return n > 0 ? *p : T(0); }
  static inline void store(T* p, reg v) { *p = v; }
  static inline void store_n(T* p, reg v, int n) {
    if (n > 0) *p = v;
  }
  static inline reg fma(reg a, reg b, reg c) {
#if defined(__FMA__)
    return std::fma(a, b, c);  // a single instruction here, rounding like the vector FMA
#else
    return a * b + c;
#endif
  }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline T sum(reg v) { return v; }
};

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
template <>
struct Vec<float> : Scalar<float> {};
template <>
struct Vec<double> : Scalar<double> {};
#endif

// out[k] = Vec<T>::sum(acc[k]) for k < 8, computed together.
//
// The AVX-512 float version is a transposed reduction (about 3 instructions
// per sum instead of 7) whose additions happen in exactly the order of
// Vec<float>::sum -- quarters q0+q2 and q1+q3, then their sum, then elements
// 0+2 and 1+3, then those two -- so an entry's value does not depend on
// whether it was reduced in a group of 8 or alone.
template <typename T>
inline void sum8(const typename Vec<T>::reg* acc, T* out) {
  for (int k = 0; k < 8; ++k) out[k] = Vec<T>::sum(acc[k]);
}

#if defined(__AVX512F__)
template <>
inline void sum8<float>(const __m512* a, float* out) {
  // 256-bit halves: [k.q0+k.q2, k.q1+k.q3] for two entries per register.
  __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  __m512 s45 = _mm512_add_ps(_mm512_shuffle_f32x4(a[4], a[5], 0x44), _mm512_shuffle_f32x4(a[4], a[5], 0xEE));
  __m512 s67 = _mm512_add_ps(_mm512_shuffle_f32x4(a[6], a[7], 0x44), _mm512_shuffle_f32x4(a[6], a[7], 0xEE));
  // 128-bit halves: one entry per 128-bit lane, entries 0..3 and 4..7.
  __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s45, s67, 0x88), _mm512_shuffle_f32x4(s45, s67, 0xDD));
  // Inside each lane: [x0+x2, y0+y2, x1+x3, y1+y3] for x = u0, y = u1, then the two halves.
  __m512 v = _mm512_add_ps(_mm512_unpacklo_ps(u0, u1), _mm512_unpackhi_ps(u0, u1));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int k = 0; k < 4; ++k) {
    out[k] = t[4 * k];
    out[4 + k] = t[4 * k + 1];
  }
}
#endif

}  // namespace simd
}  // namespace sparsestart
