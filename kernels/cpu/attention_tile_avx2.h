// Tiles of the CPU paged attention in AVX2, over fp32 rows (an fp32 cache's own, or a 16-bit
// cache's chunks widened by widen_rows) and head_dim 32, 64 or 128:
// attention_tile_avx512.h's method in eight lanes, for the CPUs without AVX-512 (the CI
// machines among them). All R x G queries of a task (R rows, G query heads to its K/V head;
// at most 32, four vectors of lanes) go through a split's keys together, with the queries in
// the vector lanes: a key's scores for 8 queries are a sum over its elements broadcast
// against the transposed queries (built once per item), so no key is transposed and no
// horizontal sum is taken; the online softmax runs lane by lane, each lane with its own
// causal limit; and the value sum broadcasts each weight against a segment of the value row,
// two queries at a time so that eight FMA chains are in flight. paged_attention.cpp sends it
// the tasks of 8 queries or more (prompt rows; a decode with 8 or more heads to a K/V head);
// fewer would leave most lanes empty, and they keep the per-row step.
#pragma once

#include <algorithm>
#include <type_traits>

#include "vec.h"

#if PALM_CPU_AVX2
#define PALM_ATTENTION_TILE_AVX2 1

namespace palm_cpu {
namespace tile_avx2 {

#define PALM_UNROLL _Pragma("GCC unroll 16")

constexpr int kMaxQueries = 32;  // four vectors of lanes

// Whether a task of this many queries (8 or more) and this head_dim runs as a tile.
inline bool takes(int64_t queries, int64_t dim) {
  return queries <= kMaxQueries && vector_head_dim(dim);
}

// rows[0, n), dim elements each (a multiple of 8), into out ([n][dim] fp32): a 16-bit
// cache's chunk for the tile (paged_attention.cpp's Fp32Chunks).
template <typename T>
void widen_rows(const T* const* rows, int n, int64_t dim, float* out) {
  for (int i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(out + i * dim + d, load8(rows[i] + d));
}

// The tile's state between chunks, 8 x NQ query lanes (index r * G + g; the lanes past the
// tile's queries hold zero queries and are never stored).
template <int NQ>
struct Lanes {
  __m256 m[NQ], l[NQ];
  __m256i limit[NQ];  // a lane sees the keys below its limit (absolute positions)
};

// All ones where key j is below the lane's limit.
__attribute__((always_inline)) inline __m256 seen_mask(__m256i limit, int j) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, _mm256_set1_epi32(j)));
}

// Keys k[0, n) (dim floats each) against the transposed queries qt ([dim][8 NQ]):
// scores[i][lane] = scale * q . k[i] where the lane sees key j0 + i, else -inf; returns the
// lanes' maxima in max. KB keys at a time share each row of qt. Each dot product is summed in
// blocks of 16 elements, each block from zero and then added to the total, as the AVX-512
// tile does: a serial chain of dim terms would lose ~dim/16 times more to rounding. While it
// works it asks for the next chunk's rows (next_n of them) into L2.
template <int D16, int NQ, int KB, typename P>
__attribute__((always_inline)) inline void scores(const float* qt, float scale,
                                                  const float* const* k, int n, int j0,
                                                  const Lanes<NQ>& lanes, const P* const* next_k,
                                                  const P* const* next_v, int next_n,
                                                  float* out, __m256* max) {
  constexpr int dim = 16 * D16, width = 8 * NQ;
  const __m256 vscale = _mm256_set1_ps(scale), neg_inf = _mm256_set1_ps(kNegInf);
  PALM_UNROLL for (int j = 0; j < NQ; ++j) max[j] = neg_inf;
  auto block = [&](auto kb, int i0) {
    constexpr int B = decltype(kb)::value;
    PALM_UNROLL for (int b = 0; b < B; ++b)
      if (i0 + b < next_n) {
        prefetch_row<_MM_HINT_T1>(next_k[i0 + b], dim);
        prefetch_row<_MM_HINT_T1>(next_v[i0 + b], dim);
      }
    __m256 total[B][NQ];
    PALM_UNROLL for (int b = 0; b < B; ++b)
      PALM_UNROLL for (int j = 0; j < NQ; ++j) total[b][j] = _mm256_setzero_ps();
    for (int d0 = 0; d0 < dim; d0 += 16) {
      __m256 acc[B][NQ];
      PALM_UNROLL for (int b = 0; b < B; ++b)
        PALM_UNROLL for (int j = 0; j < NQ; ++j) acc[b][j] = _mm256_setzero_ps();
      for (int d = d0; d < d0 + 16; ++d) {
        __m256 qv[NQ];
        PALM_UNROLL for (int j = 0; j < NQ; ++j) qv[j] = _mm256_load_ps(qt + d * width + 8 * j);
        PALM_UNROLL for (int b = 0; b < B; ++b) {
          const __m256 kd = _mm256_broadcast_ss(k[i0 + b] + d);
          PALM_UNROLL for (int j = 0; j < NQ; ++j)
            acc[b][j] = _mm256_fmadd_ps(qv[j], kd, acc[b][j]);
        }
      }
      PALM_UNROLL for (int b = 0; b < B; ++b)
        PALM_UNROLL for (int j = 0; j < NQ; ++j)
          total[b][j] = _mm256_add_ps(total[b][j], acc[b][j]);
    }
    PALM_UNROLL for (int b = 0; b < B; ++b)
      PALM_UNROLL for (int j = 0; j < NQ; ++j) {
        const __m256 s = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(total[b][j], vscale),
                                          seen_mask(lanes.limit[j], j0 + i0 + b));
        _mm256_store_ps(out + (i0 + b) * width + 8 * j, s);
        max[j] = _mm256_max_ps(max[j], s);
      }
  };
  int i0 = 0;
  for (; i0 + KB <= n; i0 += KB) block(std::integral_constant<int, KB>{}, i0);
  for (; i0 < n; ++i0) block(std::integral_constant<int, 1>{}, i0);
}

// acc[q] = alpha[q] * acc[q] + sum_i p[i][q] * v[i] for QB queries from q0 (acc rows of dim
// floats), 32 floats of the row at a time: the chunk's sum from zero in QB x 4 registers,
// joined once.
template <int D16, int QB>
__attribute__((always_inline)) inline void values(const float* p, int width, int q0,
                                                  const float* alpha, const float* const* v,
                                                  int n, float* acc) {
  constexpr int dim = 16 * D16;
  for (int d = 0; d < dim; d += 32) {
    __m256 sum[QB][4];
    PALM_UNROLL for (int b = 0; b < QB; ++b)
      PALM_UNROLL for (int j = 0; j < 4; ++j) sum[b][j] = _mm256_setzero_ps();
    for (int i = 0; i < n; ++i) {
      __m256 row[4];
      PALM_UNROLL for (int j = 0; j < 4; ++j) row[j] = _mm256_loadu_ps(v[i] + d + 8 * j);
      PALM_UNROLL for (int b = 0; b < QB; ++b) {
        const __m256 weight = _mm256_broadcast_ss(p + i * width + q0 + b);
        PALM_UNROLL for (int j = 0; j < 4; ++j)
          sum[b][j] = _mm256_fmadd_ps(weight, row[j], sum[b][j]);
      }
    }
    PALM_UNROLL for (int b = 0; b < QB; ++b) {
      const __m256 a = _mm256_set1_ps(alpha[q0 + b]);
      PALM_UNROLL for (int j = 0; j < 4; ++j) {
        float* out = acc + (q0 + b) * dim + d + 8 * j;
        _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_loadu_ps(out), a, sum[b][j]));
      }
    }
  }
}

// One item's split as a tile: queries q ([queries][dim] floats, index r * group + g, row r at
// position pos0 + r), the split's keys from chunks (paged_attention.cpp's ChunkWalker of an
// fp32 cache or Fp32Chunks of a 16-bit one: first(), n(), and fp32 rows k(), v() of each
// chunk, padded to CHUNK rows; next_n(), next_k(), next_v() of the next, in the cache's type),
// results into m, l ([queries]) and acc ([queries][dim]), which hold the state before (m
// -inf, l and acc 0 for a fresh item).
template <int D16, int NQ, int CHUNK, typename Chunks>
void attend_split(const float* q, int queries, int group, int pos0, float scale,
                  Chunks& chunks, float* m, float* l, float* acc) {
  constexpr int dim = 16 * D16, width = 8 * NQ;
  constexpr int KB = 4 / NQ > 0 ? 4 / NQ : 1;  // keys per score block: 2 x KB x NQ <= 8 regs
  alignas(32) float qt[dim * width];
  alignas(32) float p[CHUNK * width];
  alignas(32) float alpha[width];
  Lanes<NQ> lanes;
  {
    alignas(32) float m0[width], l0[width];
    alignas(32) int32_t limit[width];
    start_tile(q, queries, group, pos0, dim, width, m, l, qt, m0, l0, limit);
    PALM_UNROLL for (int j = 0; j < NQ; ++j) {
      lanes.m[j] = _mm256_load_ps(m0 + 8 * j);
      lanes.l[j] = _mm256_load_ps(l0 + 8 * j);
      lanes.limit[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(limit + 8 * j));
    }
  }
  const __m256 neg_inf = _mm256_set1_ps(kNegInf), zero = _mm256_setzero_ps();
  for (; !chunks.done(); chunks.advance()) {
    const int j0 = chunks.first(), n = chunks.n();
    __m256 max[NQ];
    scores<D16, NQ, KB>(qt, scale, chunks.k(), n, j0, lanes, chunks.next_k(), chunks.next_v(),
                        chunks.next_n(), p, max);
    // The online softmax, lane-wise. A lane that has seen no key yet keeps m = -inf: its
    // weights and alpha are then taken against 0, which makes them exactly 0.
    __m256 shift[NQ];
    PALM_UNROLL for (int j = 0; j < NQ; ++j) {
      const __m256 m_new = _mm256_max_ps(lanes.m[j], max[j]);
      shift[j] = _mm256_blendv_ps(m_new, zero, _mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ));
      const __m256 a = _mm256_and_ps(_mm256_cmp_ps(lanes.m[j], neg_inf, _CMP_NEQ_OQ),
                                     exp8(_mm256_sub_ps(lanes.m[j], shift[j])));
      _mm256_store_ps(alpha + 8 * j, a);
      lanes.m[j] = m_new;
    }
    __m256 sum[NQ];  // the chunk's weights summed apart, then joined: as vec.h's softmax_chunk
    PALM_UNROLL for (int j = 0; j < NQ; ++j) sum[j] = zero;
    for (int i = 0; i < n; ++i)
      PALM_UNROLL for (int j = 0; j < NQ; ++j) {
        float* s = p + i * width + 8 * j;
        const __m256 w = _mm256_and_ps(seen_mask(lanes.limit[j], j0 + i),
                                       exp8(_mm256_sub_ps(_mm256_load_ps(s), shift[j])));
        _mm256_store_ps(s, w);
        sum[j] = _mm256_add_ps(sum[j], w);
      }
    PALM_UNROLL for (int j = 0; j < NQ; ++j)
      lanes.l[j] = _mm256_fmadd_ps(lanes.l[j], _mm256_load_ps(alpha + 8 * j), sum[j]);
    int q0 = 0;
    const float* const* v = chunks.v();
    for (; q0 + 2 <= queries; q0 += 2) values<D16, 2>(p, width, q0, alpha, v, n, acc);
    for (; q0 < queries; ++q0) values<D16, 1>(p, width, q0, alpha, v, n, acc);
  }
  alignas(32) float m1[width], l1[width];
  PALM_UNROLL for (int j = 0; j < NQ; ++j) {
    _mm256_store_ps(m1 + 8 * j, lanes.m[j]);
    _mm256_store_ps(l1 + 8 * j, lanes.l[j]);
  }
  std::copy_n(m1, queries, m);
  std::copy_n(l1, queries, l);
}

#undef PALM_UNROLL

}  // namespace tile_avx2

// The AVX2 tile path for a split, if there is one for this head_dim and tile (takes()); false,
// doing nothing, otherwise.
template <int CHUNK, typename Chunks>
bool attend_tile_avx2(const float* q, int64_t queries, int64_t group, int64_t dim, int pos0,
                      float scale, Chunks& chunks, float* m, float* l, float* acc) {
  const int nq = int((queries + 7) / 8);
#define PALM_CASE(D16, NQ)                                                                    \
  if (dim == 16 * D16 && nq == NQ) {                                                          \
    tile_avx2::attend_split<D16, NQ, CHUNK, Chunks>(q, int(queries), int(group), pos0, scale, \
                                                    chunks, m, l, acc);                       \
    return true;                                                                              \
  }
  PALM_CASE(2, 1) PALM_CASE(2, 2) PALM_CASE(2, 3) PALM_CASE(2, 4)
  PALM_CASE(4, 1) PALM_CASE(4, 2) PALM_CASE(4, 3) PALM_CASE(4, 4)
  PALM_CASE(8, 1) PALM_CASE(8, 2) PALM_CASE(8, 3) PALM_CASE(8, 4)
#undef PALM_CASE
  return false;
}

}  // namespace palm_cpu

#else
#define PALM_ATTENTION_TILE_AVX2 0
#endif
