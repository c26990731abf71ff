// The per-row chunk step of the CPU paged attention in AVX2, for head_dim 32, 64 or 128: the G
// query heads of one query row that share a K/V head take a chunk of keys together, in groups
// of 4, 2 or 1 heads, rather than one head at a time. This is the step of the tasks that the
// AVX2 tiles (attention_tile_avx2.h) do not take: decodes with fewer than 8 heads to a K/V head
// (Llama's GQA), and rows of more than 32 heads to a K/V head. Other head_dims keep vec.h's
// step, one head at a time.
//
// - Scores: each key row is loaded once for the group's heads, 8 / group keys at a time, so
//   that one transposing sum (vec.h's hsum8x8) still yields 8 scores.
// - Values: each value row is loaded once for the group's heads, a segment of the head at a
//   time, with the group's 8 accumulators in registers.
// - Memory: while it scores a chunk it asks for the chunk's value rows (into L1) and the next
//   chunk's key rows (into L2), and while it sums the values, for the next chunk's value rows,
//   a row for each key it works on. The blocks lie anywhere in the pool, so the hardware's
//   prefetcher does not find them.
//
// Every score, weight and sum is vec.h's per-head arithmetic (dot_keys, softmax_chunk,
// scale_accumulate) in the same order, so the results equal the per-head step's bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "vec.h"

#if PALM_CPU_AVX2
#define PALM_ATTENTION_HEADS_AVX2 1

namespace palm_cpu {
namespace heads_avx2 {

#define PALM_UNROLL _Pragma("GCC unroll 16")

// GROUP heads (queries q, GROUP x dim; m, l; acc, GROUP x dim) against keys k[0, n) and
// values v[0, n), n <= CHUNK. k holds round_up(n, 8) rows that may be read (the walker pads
// it); only the first n are weighted.
template <int CHUNK, int GROUP, int D16, typename T>
void attend_chunk_group(const float* q, float scale, const T* const* k, const T* const* v,
                        int n, float* m, float* l, float* acc, const T* const* next_k,
                        const T* const* next_v, int next_n) {
  constexpr int dim = 16 * D16;
  constexpr int keys = 8 / GROUP;                       // keys per transposing sum
  constexpr int segment = std::min(8 / GROUP, 2 * D16);  // vectors of a value row at a time
  alignas(32) float w[GROUP][CHUNK];
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int i0 = 0; i0 < n; i0 += keys) {
    PALM_UNROLL for (int b = 0; b < keys; ++b) {
      if (i0 + b < n) prefetch_row<_MM_HINT_T0>(v[i0 + b], dim);
      if (i0 + b < next_n) prefetch_row<_MM_HINT_T1>(next_k[i0 + b], dim);
    }
    __m256 dots[8];
    PALM_UNROLL for (int j = 0; j < 8; ++j) dots[j] = _mm256_setzero_ps();
    PALM_UNROLL for (int d = 0; d < dim; d += 8) {
      __m256 row[keys];
      PALM_UNROLL for (int b = 0; b < keys; ++b) row[b] = load8(k[i0 + b] + d);
      PALM_UNROLL for (int g = 0; g < GROUP; ++g) {
        const __m256 qv = _mm256_loadu_ps(q + g * dim + d);
        PALM_UNROLL for (int b = 0; b < keys; ++b)
          dots[g * keys + b] = _mm256_fmadd_ps(qv, row[b], dots[g * keys + b]);
      }
    }
    alignas(32) float s[8];
    _mm256_store_ps(s, _mm256_mul_ps(hsum8x8(dots), vscale));
    PALM_UNROLL for (int g = 0; g < GROUP; ++g)
      PALM_UNROLL for (int b = 0; b < keys; ++b) w[g][i0 + b] = s[g * keys + b];
  }
  float alpha[GROUP];
  PALM_UNROLL for (int g = 0; g < GROUP; ++g) alpha[g] = softmax_chunk(w[g], n, m[g], l[g]);
  for (int d = 0; d < dim; d += 8 * segment) {
    __m256 sum[GROUP][segment];
    PALM_UNROLL for (int g = 0; g < GROUP; ++g)
      PALM_UNROLL for (int j = 0; j < segment; ++j) sum[g][j] = _mm256_setzero_ps();
    for (int i = 0; i < n; ++i) {
      if (d == 0 && i < next_n) prefetch_row<_MM_HINT_T1>(next_v[i], dim);
      __m256 row[segment];
      PALM_UNROLL for (int j = 0; j < segment; ++j) row[j] = load8(v[i] + d + 8 * j);
      PALM_UNROLL for (int g = 0; g < GROUP; ++g) {
        const __m256 weight = _mm256_broadcast_ss(&w[g][i]);
        PALM_UNROLL for (int j = 0; j < segment; ++j)
          sum[g][j] = _mm256_fmadd_ps(weight, row[j], sum[g][j]);
      }
    }
    PALM_UNROLL for (int g = 0; g < GROUP; ++g)
      PALM_UNROLL for (int j = 0; j < segment; ++j) {
        float* a = acc + g * dim + d + 8 * j;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_set1_ps(alpha[g]),
                                            sum[g][j]));
      }
  }
}

#undef PALM_UNROLL

}  // namespace heads_avx2

// Every head of one query row (queries, m, l, acc for heads [0, heads)) against a chunk, in
// groups of 4, 2 or 1 heads (the first group asks for the next chunk's rows). For head_dim 32,
// 64 or 128 only (vector_head_dim).
template <int CHUNK, typename T>
void attend_chunk_row_avx2(const float* q, int64_t heads, int64_t dim, float scale,
                           const T* const* k, const T* const* v, int n, float* m, float* l,
                           float* acc, const T* const* next_k, const T* const* next_v,
                           int next_n) {
  for (int64_t g = 0; g < heads;) {
    const int64_t left = heads - g, group = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const int ahead = g == 0 ? next_n : 0;
#define PALM_CASE(D16, G)                                                                  \
  if (dim == 16 * D16 && group == G) {                                                     \
    heads_avx2::attend_chunk_group<CHUNK, G, D16, T>(q + g * dim, scale, k, v, n, m + g,   \
                                                     l + g, acc + g * dim, next_k, next_v, \
                                                     ahead);                               \
  } else
    PALM_CASE(2, 4) PALM_CASE(2, 2) PALM_CASE(2, 1)
    PALM_CASE(4, 4) PALM_CASE(4, 2) PALM_CASE(4, 1)
    PALM_CASE(8, 4) PALM_CASE(8, 2) PALM_CASE(8, 1) {}
#undef PALM_CASE
    g += group;
  }
}

}  // namespace palm_cpu

#else
#define PALM_ATTENTION_HEADS_AVX2 0
#endif
