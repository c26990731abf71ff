// Tiles of the CPU paged attention in AVX-512, over fp32 rows (as attention_avx512.h) and
// head_dim 32, 64 or 128: all R x G queries of a task (R rows, G query heads to its K/V
// head) go through a split's keys together, with the queries in the vector lanes. The
// scores of 16 queries against a key are then a sum over the key's elements broadcast
// against the transposed queries (built once per item), so a chunk needs no transposition
// and no horizontal sum; the online softmax runs lane by lane, each lane with its own causal
// limit; and the value sum broadcasts each weight against the value row, 16 accumulators to
// a group of queries. paged_attention.cpp sends it the tasks of 8 queries or more (prompt
// rows; a decode with 8 heads or more to a K/V head); a decode of fewer heads, which would
// leave most lanes empty, keeps the per-row step (attention_avx512.h). Compiled only here,
// for AVX-512F, and run only where isa.h's avx512_enabled() says so.
#pragma once

#include <type_traits>

#include "attention_avx512.h"
#include "vec.h"

#if PALM_CPU_AVX2 && defined(__x86_64__) && defined(__GNUC__)
#define PALM_ATTENTION_TILE_AVX512 1
#include <immintrin.h>

namespace palm_cpu {

#pragma GCC push_options
#pragma GCC target("avx512f")
#define PALM_UNROLL _Pragma("GCC unroll 16")

// exp8 (vec.h) sixteen lanes wide: its constants, the same steps.
__attribute__((always_inline)) inline __m512 exp16(__m512 x) {
  using namespace expf_cephes;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-kMaxArg)), _mm512_set1_ps(kMaxArg));
  __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), x);
  __m512 y = _mm512_set1_ps(kPoly[0]);
  PALM_UNROLL for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i pow2n = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
}

// The tile's state between chunks, 16 x NQ query lanes (index r * G + g; the lanes past the
// tile's queries hold zero queries and are never stored).
template <int NQ>
struct TileLanes {
  __m512 m[NQ], l[NQ];
  __m512i limit[NQ];  // a lane sees the keys below its limit (absolute positions)
};

// Keys k[0, n) (rows of D16 x 16 floats) against the transposed queries qt ([dim][16 NQ]):
// scores[i][lane] = scale * q . k[i] where the lane sees key j0 + i, else -inf; returns the
// lanes' maxima. KB keys at a time share each row of qt. With key i it asks for row i of the
// next chunk (next_k, next_v: next_n rows of the cache's own type P) into L2: the blocks lie
// anywhere in the pool, so the hardware's prefetcher does not find them.
template <int D16, int NQ, int KB, typename P>
__attribute__((always_inline)) inline void tile_scores(const float* qt, float scale,
                                                       const float* const* k, int n, int j0,
                                                       const TileLanes<NQ>& lanes,
                                                       const P* const* next_k,
                                                       const P* const* next_v, int next_n,
                                                       float* scores, __m512* max) {
  constexpr int dim = 16 * D16, width = 16 * NQ;
  PALM_UNROLL for (int j = 0; j < NQ; ++j) max[j] = _mm512_set1_ps(kNegInf);
  const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(kNegInf);
  auto finish = [&](int i, int j, __m512 dot) {
    const __mmask16 seen = _mm512_cmplt_epi32_mask(_mm512_set1_epi32(j0 + i), lanes.limit[j]);
    const __m512 s = _mm512_mask_mul_ps(neg_inf, seen, dot, vscale);
    _mm512_store_ps(scores + i * width + 16 * j, s);
    max[j] = _mm512_max_ps(max[j], s);
  };
  // Each dot product in blocks of 16 elements, each block summed from zero and then added
  // to the total: a serial chain of dim terms would lose ~dim/16 times more to rounding.
  auto block = [&](auto kb, int i0) {
    constexpr int B = decltype(kb)::value;
    PALM_UNROLL for (int b = 0; b < B; ++b)
      if (i0 + b < next_n) {
        prefetch_row<_MM_HINT_T1>(next_k[i0 + b], dim);
        prefetch_row<_MM_HINT_T1>(next_v[i0 + b], dim);
      }
    __m512 total[B][NQ];
    PALM_UNROLL for (int b = 0; b < B; ++b)
      PALM_UNROLL for (int j = 0; j < NQ; ++j) total[b][j] = _mm512_setzero_ps();
    for (int d0 = 0; d0 < dim; d0 += 16) {
      __m512 acc[B][NQ];
      PALM_UNROLL for (int b = 0; b < B; ++b)
        PALM_UNROLL for (int j = 0; j < NQ; ++j) acc[b][j] = _mm512_setzero_ps();
      for (int d = d0; d < d0 + 16; ++d) {
        __m512 qv[NQ];
        PALM_UNROLL for (int j = 0; j < NQ; ++j) qv[j] = _mm512_load_ps(qt + d * width + 16 * j);
        PALM_UNROLL for (int b = 0; b < B; ++b) {
          const __m512 kd = _mm512_set1_ps(k[i0 + b][d]);
          PALM_UNROLL for (int j = 0; j < NQ; ++j)
            acc[b][j] = _mm512_fmadd_ps(qv[j], kd, acc[b][j]);
        }
      }
      PALM_UNROLL for (int b = 0; b < B; ++b)
        PALM_UNROLL for (int j = 0; j < NQ; ++j)
          total[b][j] = _mm512_add_ps(total[b][j], acc[b][j]);
    }
    PALM_UNROLL for (int b = 0; b < B; ++b)
      PALM_UNROLL for (int j = 0; j < NQ; ++j) finish(i0 + b, j, total[b][j]);
  };
  int i0 = 0;
  for (; i0 + KB <= n; i0 += KB) block(std::integral_constant<int, KB>{}, i0);
  for (; i0 < n; ++i0) block(std::integral_constant<int, 1>{}, i0);
}

// acc[q] = alpha[q] * acc[q] + sum_i p[i][q] * v[i] for QB queries from q0 (acc rows of dim
// floats); the chunk's sum from zero in registers (QB x D16 <= 16 of them), joined once.
template <int D16, int QB>
__attribute__((always_inline)) inline void tile_values(const float* p, int width, int q0,
                                                       const float* alpha,
                                                       const float* const* v, int n,
                                                       float* acc) {
  constexpr int dim = 16 * D16;
  __m512 sum[QB][D16];
  PALM_UNROLL for (int b = 0; b < QB; ++b)
    PALM_UNROLL for (int j = 0; j < D16; ++j) sum[b][j] = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) {
    __m512 row[D16];
    PALM_UNROLL for (int j = 0; j < D16; ++j) row[j] = _mm512_loadu_ps(v[i] + 16 * j);
    PALM_UNROLL for (int b = 0; b < QB; ++b) {
      const __m512 weight = _mm512_set1_ps(p[i * width + q0 + b]);
      PALM_UNROLL for (int j = 0; j < D16; ++j)
        sum[b][j] = _mm512_fmadd_ps(weight, row[j], sum[b][j]);
    }
  }
  PALM_UNROLL for (int b = 0; b < QB; ++b)
    PALM_UNROLL for (int j = 0; j < D16; ++j) {
      float* a = acc + (q0 + b) * dim + 16 * j;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_loadu_ps(a), _mm512_set1_ps(alpha[q0 + b]),
                                          sum[b][j]));
    }
}

// One item's split as a tile: queries q ([queries][dim] floats, index r * group + g, row r at
// position pos0 + r), the split's keys from chunks (paged_attention.cpp's ChunkWalker of an
// fp32 cache or Fp32Chunks of a 16-bit one: first(), n(), and fp32 rows k(), v() of each
// chunk, padded to CHUNK rows; next_n(), next_k(), next_v() of the next, in the cache's type),
// results into m, l ([queries]) and acc ([queries][dim]), which hold the state before (m
// -inf, l and acc 0 for a fresh item).
template <int D16, int NQ, int CHUNK, typename Chunks>
void attend_tile_split(const float* q, int queries, int group, int pos0, float scale,
                       Chunks& chunks, float* m, float* l, float* acc) {
  constexpr int dim = 16 * D16, width = 16 * NQ;
  constexpr int QB = 16 / D16;                // queries per value sum: 16 accumulators
  constexpr int KB = NQ >= 4 ? 2 : 8 / NQ;    // keys per score block: 6-8 FMA chains
  alignas(64) float qt[dim * width];
  alignas(64) float p[CHUNK * width];
  alignas(64) float alpha[width];
  TileLanes<NQ> lanes;
  {
    alignas(64) float m0[width], l0[width];
    alignas(64) int32_t limit[width];
    start_tile(q, queries, group, pos0, dim, width, m, l, qt, m0, l0, limit);
    PALM_UNROLL for (int j = 0; j < NQ; ++j) {
      lanes.m[j] = _mm512_load_ps(m0 + 16 * j);
      lanes.l[j] = _mm512_load_ps(l0 + 16 * j);
      lanes.limit[j] = _mm512_load_si512(limit + 16 * j);
    }
  }
  const __m512 neg_inf = _mm512_set1_ps(kNegInf), zero = _mm512_setzero_ps();
  for (; !chunks.done(); chunks.advance()) {
    const int j0 = chunks.first(), n = chunks.n();
    __m512 max[NQ];
    tile_scores<D16, NQ, KB>(qt, scale, chunks.k(), n, j0, lanes, chunks.next_k(),
                             chunks.next_v(), chunks.next_n(), p, max);
    // The online softmax, lane-wise. A lane that has seen no key yet keeps m = -inf: its
    // weights and alpha are then taken against 0, which makes them exactly 0.
    __m512 shift[NQ];
    PALM_UNROLL for (int j = 0; j < NQ; ++j) {
      const __m512 m_new = _mm512_max_ps(lanes.m[j], max[j]);
      shift[j] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ), m_new, zero);
      const __m512 a = _mm512_maskz_mov_ps(
          _mm512_cmp_ps_mask(lanes.m[j], neg_inf, _CMP_NEQ_OQ),
          exp16(_mm512_sub_ps(lanes.m[j], shift[j])));
      _mm512_store_ps(alpha + 16 * j, a);
      lanes.m[j] = m_new;
    }
    __m512 sum[NQ];  // the chunk's weights summed apart, then joined: as vec.h's softmax_chunk
    PALM_UNROLL for (int j = 0; j < NQ; ++j) sum[j] = zero;
    for (int i = 0; i < n; ++i)
      PALM_UNROLL for (int j = 0; j < NQ; ++j) {
        float* s = p + i * width + 16 * j;
        const __mmask16 seen =
            _mm512_cmplt_epi32_mask(_mm512_set1_epi32(j0 + i), lanes.limit[j]);
        const __m512 w =
            _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(_mm512_load_ps(s), shift[j])));
        _mm512_store_ps(s, w);
        sum[j] = _mm512_add_ps(sum[j], w);
      }
    PALM_UNROLL for (int j = 0; j < NQ; ++j)
      lanes.l[j] = _mm512_fmadd_ps(lanes.l[j], _mm512_load_ps(alpha + 16 * j), sum[j]);
    int q0 = 0;
    const float* const* v = chunks.v();
    for (; q0 + QB <= queries; q0 += QB) tile_values<D16, QB>(p, width, q0, alpha, v, n, acc);
    for (; q0 < queries; ++q0) tile_values<D16, 1>(p, width, q0, alpha, v, n, acc);
  }
  alignas(64) float m1[width], l1[width];
  PALM_UNROLL for (int j = 0; j < NQ; ++j) {
    _mm512_store_ps(m1 + 16 * j, lanes.m[j]);
    _mm512_store_ps(l1 + 16 * j, lanes.l[j]);
  }
  std::copy_n(m1, queries, m);
  std::copy_n(l1, queries, l);
}

// The tile path for a split, if there is one for this head_dim and tile (at most 64
// queries); false, doing nothing, otherwise.
template <int CHUNK, typename Chunks>
bool attend_tile(const float* q, int64_t queries, int64_t group, int64_t dim, int pos0,
                 float scale, Chunks& chunks, float* m, float* l, float* acc) {
  const int nq = int((queries + 15) / 16);
  if (!vector_head_dim(dim) || nq > 4) return false;
#define PALM_CASE(D16, NQ)                                                                    \
  if (dim == 16 * D16 && nq == NQ) {                                                          \
    attend_tile_split<D16, NQ, CHUNK, Chunks>(q, int(queries), int(group), pos0, scale,      \
                                               chunks, m, l, acc);                             \
    return true;                                                                              \
  }
  PALM_CASE(2, 1) PALM_CASE(2, 2) PALM_CASE(2, 3) PALM_CASE(2, 4)
  PALM_CASE(4, 1) PALM_CASE(4, 2) PALM_CASE(4, 3) PALM_CASE(4, 4)
  PALM_CASE(8, 1) PALM_CASE(8, 2) PALM_CASE(8, 3) PALM_CASE(8, 4)
#undef PALM_CASE
  return false;
}

#undef PALM_UNROLL
#pragma GCC pop_options

}  // namespace palm_cpu

#else
#define PALM_ATTENTION_TILE_AVX512 0
#endif
