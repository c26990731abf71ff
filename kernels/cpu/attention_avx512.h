// The chunk step of the CPU paged attention in AVX-512, over fp32 rows (an fp32 cache's own,
// or a 16-bit cache's widened by widen_rows) and head_dim 32, 64 or 128: the G query heads
// of one query row that share a K/V head take a chunk of keys together. The scores of 16
// keys come out of one transposing reduction (no horizontal sum per key), and the value sum
// loads each V row once for a group of heads whose accumulators stay in registers. The
// softmax update is vec.h's. Compiled only here, for AVX-512F, and run only where isa.h's
// avx512_enabled() says so.
#pragma once

#include "vec.h"

#if PALM_CPU_AVX2 && defined(__x86_64__) && defined(__GNUC__)
#define PALM_ATTENTION_AVX512 1
#include <immintrin.h>

namespace palm_cpu {

#pragma GCC push_options
#pragma GCC target("avx512f")
#define PALM_UNROLL _Pragma("GCC unroll 16")

// Lane i of the result is the sum of the 16 lanes of v[i].
__attribute__((always_inline)) inline __m512 hsum16x16(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  PALM_UNROLL for (int j = 0; j < 8; ++j)  // per 128-bit lane: sums of lanes 0+2, 1+3
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  PALM_UNROLL for (int j = 0; j < 4; ++j)  // per 128-bit lane: its sum, for 4 vectors
    quads[j] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * j], pairs[2 * j + 1], 0xEE));
  PALM_UNROLL for (int j = 0; j < 2; ++j)  // across the 128-bit lanes, in two steps
    halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

// Sixteen elements of a cache row in fp32 (exact for every storage type).
__attribute__((always_inline)) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((always_inline)) inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen each lane and shift it into place.
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// rows[0, n), dim elements each (a multiple of 16), into out ([n][dim] fp32).
template <typename T>
void widen_rows(const T* const* rows, int n, int64_t dim, float* out) {
  for (int i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; d += 16)
      _mm512_storeu_ps(out + i * dim + d, load16(rows[i] + d));
}

// GROUP heads (queries q, GROUP x dim; running m, l; accumulators acc, GROUP x dim) against
// keys k[0, n) and values v[0, n), n <= chunk. k holds round_up(n, 16) rows that may be
// read (the caller pads it); only the first n are weighted. It asks memory for the rows of
// the chunk after (next_k, next_v: next_n of them, in the cache's own type P): the blocks lie
// anywhere in the pool, so the hardware's prefetcher does not find them. The requests are
// spread over the chunk's work, a few rows per step: the next keys while it scores, the next
// values while it sums. Asked for in bunches (all during the value sum, or at the chunk's
// start), they queued behind the core's few outstanding misses and the kernel read memory at
// two thirds of the rate two threads can (docs/BENCHMARKS.md, "Prefetches spread over the
// chunk").
template <int D16, int GROUP, int CHUNK, typename P>
void attend_chunk_heads(const float* q, float scale, const float* const* k,
                        const float* const* v, int n, float* m, float* l, float* acc,
                        const P* const* next_k, const P* const* next_v, int next_n) {
  constexpr int dim = 16 * D16;
  alignas(64) float w[GROUP][CHUNK];
  // While head g scores 16 keys it asks for every GROUP-th of their rows from g: the next
  // chunk's keys into L2, and this chunk's values into L1, which the value sum below would
  // otherwise wait on (one miss per key, from L2 at best).
  for (int g = 0; g < GROUP; ++g) {
    __m512 qv[D16];
    PALM_UNROLL for (int j = 0; j < D16; ++j) qv[j] = _mm512_loadu_ps(q + g * dim + 16 * j);
    for (int i0 = 0; i0 < n; i0 += 16) {
      for (int i = i0 + g; i < i0 + 16 && i < next_n; i += GROUP)
        prefetch_row<_MM_HINT_T1>(next_k[i], dim);
      for (int i = i0 + g; i < i0 + 16 && i < n; i += GROUP) prefetch_row<_MM_HINT_T0>(v[i], dim);
      __m512 dots[16];
      PALM_UNROLL for (int i = 0; i < 16; ++i) {
        const float* key = k[i0 + i];
        __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(key));
        PALM_UNROLL for (int j = 1; j < D16; ++j)
          s = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(key + 16 * j), s);
        dots[i] = s;
      }
      _mm512_store_ps(w[g] + i0, _mm512_mul_ps(hsum16x16(dots), _mm512_set1_ps(scale)));
    }
  }
  float alpha[GROUP];
  for (int g = 0; g < GROUP; ++g) alpha[g] = softmax_chunk(w[g], n, m[g], l[g]);
  // As scale_accumulate: the chunk's sum from zero in registers, joined to acc once.
  __m512 sum[GROUP][D16];
  PALM_UNROLL for (int g = 0; g < GROUP; ++g)
    PALM_UNROLL for (int j = 0; j < D16; ++j) sum[g][j] = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) {
    if (i < next_n) prefetch_row<_MM_HINT_T1>(next_v[i], dim);
    __m512 row[D16];
    PALM_UNROLL for (int j = 0; j < D16; ++j) row[j] = _mm512_loadu_ps(v[i] + 16 * j);
    PALM_UNROLL for (int g = 0; g < GROUP; ++g) {
      const __m512 weight = _mm512_set1_ps(w[g][i]);
      PALM_UNROLL for (int j = 0; j < D16; ++j)
        sum[g][j] = _mm512_fmadd_ps(weight, row[j], sum[g][j]);
    }
  }
  PALM_UNROLL for (int g = 0; g < GROUP; ++g)
    PALM_UNROLL for (int j = 0; j < D16; ++j) {
      float* a = acc + g * dim + 16 * j;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_loadu_ps(a), _mm512_set1_ps(alpha[g]),
                                          sum[g][j]));
    }
}

// Every head of one query row (queries, m, l, acc for heads [0, heads)), in groups whose
// value accumulators fit in 16 registers (the first group prefetches the next chunk). For
// head_dim 32, 64 or 128 only (vector_head_dim).
template <int CHUNK, typename P>
void attend_chunk_row(const float* q, int64_t heads, int64_t dim, float scale,
                      const float* const* k, const float* const* v, int n, float* m, float* l,
                      float* acc, const P* const* next_k, const P* const* next_v, int next_n) {
  for (int64_t g = 0; g < heads;) {
    const int64_t left = heads - g;
    const int64_t most = 16 / (dim / 16);  // 8, 4 or 2 heads
    const int64_t group = left >= 8 && most >= 8   ? 8
                          : left >= 4 && most >= 4 ? 4
                          : left >= 2              ? 2
                                                   : 1;
    const float* qg = q + g * dim;
    float* ag = acc + g * dim;
#define PALM_CASE(D16, G)                                                         \
  if (dim == 16 * D16 && group == G) {                                            \
    attend_chunk_heads<D16, G, CHUNK, P>(qg, scale, k, v, n, m + g, l + g, ag, next_k, \
                                         next_v, g == 0 ? next_n : 0);            \
  } else
    PALM_CASE(2, 8) PALM_CASE(2, 4) PALM_CASE(2, 2) PALM_CASE(2, 1)
    PALM_CASE(4, 4) PALM_CASE(4, 2) PALM_CASE(4, 1)
    PALM_CASE(8, 2) PALM_CASE(8, 1) {}
#undef PALM_CASE
    g += group;
  }
}

#undef PALM_UNROLL
#pragma GCC pop_options

}  // namespace palm_cpu

#else
#define PALM_ATTENTION_AVX512 0
#endif
