// The vector primitives of the CPU kernels: fp32 compute over fp32 / fp16 / bf16 storage.
//
// Built with AVX2 + FMA + F16C where the build machine has them (kernels/cpu/build.py
// passes -mavx2 -mfma -mf16c), scalar loops otherwise; the scalar versions are the same
// arithmetic, one lane at a time. No AVX-512: the CI machines lack it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PALM_CPU_AVX2 1
#else
#define PALM_CPU_AVX2 0
#endif

namespace palm_cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// c10's conversions round to nearest even, as torch's .to(dtype) does.
template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

#if PALM_CPU_AVX2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen each lane and shift it into place.
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// e^x to ~2 ulp (Cephes' expf, as in avx_mathfun): e^x = 2^n * e^r, |r| <= ln2 / 2, with
// ln2 split in two so that r keeps its low bits. Inputs below -88.38 give ~0, never NaN.
// The constants serve exp8 here and its wider twin exp16 (attention_tile_avx512.h).
namespace expf_cephes {
constexpr float kMaxArg = 88.3762626647949f;  // |x| is clamped to this
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
// e^r = 1 + r + r^2 (p0 r^5 + p1 r^4 + ... + p5), by Horner from p0
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace expf_cephes

inline __m256 exp8(__m256 x) {
  using namespace expf_cephes;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-kMaxArg)), _mm256_set1_ps(kMaxArg));
  __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), x);
  __m256 y = _mm256_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i pow2n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// Eight horizontal sums at once: lane i of the result is the sum of a[i]'s lanes.
inline __m256 hsum8x8(const __m256* a) {
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
  __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
  __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23);  // lanes: a0..a3 low halves, a0..a3 high halves
  __m256 s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes [0, n) set (n in 0..8), for the ragged last group of a row of scores.
inline __m256 lane_mask(int n) {
  __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota));
}

// Asks for a cache row (dim elements of T) to come into L1 (Hint _MM_HINT_T0) or L2
// (_MM_HINT_T1) before the attention reads it: the blocks lie anywhere in the pool, so the
// hardware's prefetcher does not find them.
template <_mm_hint Hint, typename T>
__attribute__((always_inline)) inline void prefetch_row(const T* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * int64_t(sizeof(T)); b += 64) _mm_prefetch(p + b, Hint);
}

// r[0..8) as the rows of an 8 x 8 matrix, transposed in place.
inline void transpose8x8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

#endif  // PALM_CPU_AVX2

// scores[i] = scale * (q . keys[i]) for i < n. keys holds round_up(n, 8) valid rows (the
// caller pads with a row it may read), so the vector path never branches on n.
template <typename T>
inline void dot_keys(const float* q, const T* const* keys, int n, int dim, float scale,
                     float* scores) {
#if PALM_CPU_AVX2
  const int dim8 = dim & ~7;
  for (int i0 = 0; i0 < n; i0 += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < dim8; d += 8) {
      __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(keys[i0 + j] + d), acc[j]);
    }
    __m256 s = hsum8x8(acc);
    if (dim8 < dim) {
      alignas(32) float tail[8] = {};
      for (int j = 0; j < 8; ++j)
        for (int d = dim8; d < dim; ++d) tail[j] += q[d] * to_float(keys[i0 + j][d]);
      s = _mm256_add_ps(s, _mm256_load_ps(tail));
    }
    _mm256_storeu_ps(scores + i0, _mm256_mul_ps(s, _mm256_set1_ps(scale)));
  }
#else
  for (int i = 0; i < n; ++i) {
    float s = 0.f;
    for (int d = 0; d < dim; ++d) s += q[d] * to_float(keys[i][d]);
    scores[i] = s * scale;
  }
#endif
}

// One chunk of the online softmax (Milakov & Gimelshein, arXiv:1805.02867): with the
// running max m and sum l of the keys before, turn scores[0, n) into their weights
// exp(s - m') and return the factor alpha = exp(m - m') the earlier accumulation must
// take. scores has room for round_up(n, 8) floats.
inline float softmax_chunk(float* scores, int n, float& m, float& l) {
#if PALM_CPU_AVX2
  __m256 vmax = _mm256_set1_ps(kNegInf);
  for (int i = 0; i < n; i += 8) {
    __m256 s = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_loadu_ps(scores + i),
                                lane_mask(n - i));
    vmax = _mm256_max_ps(vmax, s);
  }
  const float m_new = std::max(m, hmax(vmax));
  __m256 vm = _mm256_set1_ps(m_new), vsum = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), vm)),
                             lane_mask(n - i));
    _mm256_storeu_ps(scores + i, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  const float sum = hsum(vsum);
#else
  float m_new = m;
  for (int i = 0; i < n; ++i) m_new = std::max(m_new, scores[i]);
  float sum = 0.f;
  for (int i = 0; i < n; ++i) {
    scores[i] = std::exp(scores[i] - m_new);
    sum += scores[i];
  }
#endif
  // Before the first chunk m is -inf and nothing is accumulated: alpha 0, spelled out.
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// acc[0, dim) = alpha * acc + sum_i p[i] * values[i]. The chunk's sum starts from zero in
// registers and joins acc once (blocked summation: the rounding error grows with the number
// of chunks, not of keys), 32 floats of the head at a time.
template <typename T>
inline void scale_accumulate(float* acc, float alpha, const float* p, const T* const* values,
                             int n, int dim) {
  int d = 0;
#if PALM_CPU_AVX2
  const __m256 va = _mm256_set1_ps(alpha);
  for (; d + 32 <= dim; d += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < n; ++i) {
      const __m256 w = _mm256_set1_ps(p[i]);
      const T* v = values[i] + d;
      a0 = _mm256_fmadd_ps(w, load8(v), a0);
      a1 = _mm256_fmadd_ps(w, load8(v + 8), a1);
      a2 = _mm256_fmadd_ps(w, load8(v + 16), a2);
      a3 = _mm256_fmadd_ps(w, load8(v + 24), a3);
    }
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(_mm256_loadu_ps(acc + d), va, a0));
    _mm256_storeu_ps(acc + d + 8, _mm256_fmadd_ps(_mm256_loadu_ps(acc + d + 8), va, a1));
    _mm256_storeu_ps(acc + d + 16, _mm256_fmadd_ps(_mm256_loadu_ps(acc + d + 16), va, a2));
    _mm256_storeu_ps(acc + d + 24, _mm256_fmadd_ps(_mm256_loadu_ps(acc + d + 24), va, a3));
  }
  for (; d + 8 <= dim; d += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int i = 0; i < n; ++i) a = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), load8(values[i] + d), a);
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(_mm256_loadu_ps(acc + d), va, a));
  }
#endif
  for (; d < dim; ++d) {
    float a = 0.f;
    for (int i = 0; i < n; ++i) a += p[i] * to_float(values[i][d]);
    acc[d] = acc[d] * alpha + a;
  }
}

// The head_dims the attention's vector steps (the tiles, and the row steps that take a row's
// heads together) are written for; other head_dims take vec.h's per-head step.
inline bool vector_head_dim(int64_t dim) { return dim == 32 || dim == 64 || dim == 128; }

// The start of an attention tile (attention_tile_avx2.h, attention_tile_avx512.h):
// the queries q ([queries][dim]) transposed into qt ([dim][width], zero past the queries),
// and each of the width lanes' running m, l and causal limit (row r = lane / group sees the
// keys below pos0 + r + 1; lanes past the queries see none).
inline void start_tile(const float* q, int queries, int group, int pos0, int dim, int width,
                       const float* m, const float* l, float* qt, float* m0, float* l0,
                       int32_t* limit) {
#if PALM_CPU_AVX2
  // eight queries by eight elements at a time (a tile's dim and width are multiples of 8)
  for (int i0 = 0; i0 < width; i0 += 8)
    for (int d0 = 0; d0 < dim; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = i0 + i < queries ? _mm256_loadu_ps(q + (i0 + i) * dim + d0) : _mm256_setzero_ps();
      transpose8x8(r);
      for (int d = 0; d < 8; ++d) _mm256_store_ps(qt + (d0 + d) * width + i0, r[d]);
    }
#else
  for (int d = 0; d < dim; ++d)
    for (int i = 0; i < width; ++i) qt[d * width + i] = i < queries ? q[i * dim + d] : 0.f;
#endif
  for (int i = 0; i < width; ++i) {
    m0[i] = i < queries ? m[i] : kNegInf;
    l0[i] = i < queries ? l[i] : 0.f;
    limit[i] = i < queries ? pos0 + i / group + 1 : 0;
  }
}

}  // namespace palm_cpu
