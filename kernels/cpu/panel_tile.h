// The AVX2 micro-kernel of the CPU linears whose weights lie in panels (panels.h): a tile of
// up to kRows = 6 rows of x by one panel of 16 output channels, 12 fp32 accumulators; per k,
// the panel's 16 weights (int8 widened in registers, or fp32) and six broadcasts of x feed
// 12 FMAs. int8_linear.cpp runs it on every CPU, panel_linear.cpp where there is no AVX-512.
// Scalar loops, the same arithmetic one lane at a time, where the build has no AVX2.
#pragma once

#include <algorithm>
#include <cstdint>

#include "panels.h"
#include "vec.h"

namespace palm_cpu {
namespace panel_tile {

constexpr int kRows = 6;  // rows of x per tile
// Rows of x per pass over a thread's panels (a multiple of kRows): a block of x stays in L2
// while the panels pass over it, not the whole of x once per panel.
constexpr int64_t kRowBlock = 48;

// Fully unrolled early, so that the accumulator arrays below live in registers (without
// it GCC kept them on the stack and stored every accumulator after each FMA: half speed).
#define PALM_TILE_UNROLL _Pragma("GCC unroll 16")

#if PALM_CPU_AVX2

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }

// ROWS rows of x (row stride ldx) against one panel: out[r][0..16) = x[r] . panel * scale,
// or unscaled where scale is null.
// Few rows give few independent accumulators, and an FMA's latency would then bound the
// loop: U copies of each accumulator take alternate k, so at least 8 chains are in flight.
template <int ROWS, typename W>
void tile(const float* x, int64_t ldx, const W* panel, int64_t K, const float* scale,
          float* out, int64_t ldo, int64_t cols) {
  constexpr int U = ROWS >= 3 ? 1 : 4 / ROWS;
  __m256 acc[ROWS][U][2];
  PALM_TILE_UNROLL for (int r = 0; r < ROWS; ++r)
    PALM_TILE_UNROLL for (int u = 0; u < U; ++u) acc[r][u][0] = acc[r][u][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    PALM_TILE_UNROLL for (int u = 0; u < U; ++u) {
      const __m256 w0 = widen8(panel + (k + u) * kPanel);
      const __m256 w1 = widen8(panel + (k + u) * kPanel + 8);
      PALM_TILE_UNROLL for (int r = 0; r < ROWS; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k + u);
        acc[r][u][0] = _mm256_fmadd_ps(xv, w0, acc[r][u][0]);
        acc[r][u][1] = _mm256_fmadd_ps(xv, w1, acc[r][u][1]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m256 w0 = widen8(panel + k * kPanel), w1 = widen8(panel + k * kPanel + 8);
    PALM_TILE_UNROLL for (int r = 0; r < ROWS; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0][0] = _mm256_fmadd_ps(xv, w0, acc[r][0][0]);
      acc[r][0][1] = _mm256_fmadd_ps(xv, w1, acc[r][0][1]);
    }
  }
  const __m256 s0 = scale ? _mm256_loadu_ps(scale) : _mm256_set1_ps(1.0f);
  const __m256 s1 = scale ? _mm256_loadu_ps(scale + 8) : _mm256_set1_ps(1.0f);
  PALM_TILE_UNROLL for (int r = 0; r < ROWS; ++r) {
    PALM_TILE_UNROLL for (int u = 1; u < U; ++u) {
      acc[r][0][0] = _mm256_add_ps(acc[r][0][0], acc[r][u][0]);
      acc[r][0][1] = _mm256_add_ps(acc[r][0][1], acc[r][u][1]);
    }
    alignas(32) float row[kPanel];
    _mm256_store_ps(row, _mm256_mul_ps(acc[r][0][0], s0));
    _mm256_store_ps(row + 8, _mm256_mul_ps(acc[r][0][1], s1));
    std::copy(row, row + cols, out + r * ldo);
  }
}

#else

template <int ROWS, typename W>
void tile(const float* x, int64_t ldx, const W* panel, int64_t K, const float* scale,
          float* out, int64_t ldo, int64_t cols) {
  float acc[ROWS][kPanel] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < ROWS; ++r)
      for (int64_t c = 0; c < kPanel; ++c)
        acc[r][c] += x[r * ldx + k] * static_cast<float>(panel[k * kPanel + c]);
  for (int r = 0; r < ROWS; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * ldo + c] = scale ? acc[r][c] * scale[c] : acc[r][c];
}

#endif

template <typename W>
void run_tile(int rows, const float* x, int64_t ldx, const W* panel, int64_t K,
              const float* scale, float* out, int64_t ldo, int64_t cols) {
  switch (rows) {
    case 6: return tile<6>(x, ldx, panel, K, scale, out, ldo, cols);
    case 5: return tile<5>(x, ldx, panel, K, scale, out, ldo, cols);
    case 4: return tile<4>(x, ldx, panel, K, scale, out, ldo, cols);
    case 3: return tile<3>(x, ldx, panel, K, scale, out, ldo, cols);
    case 2: return tile<2>(x, ldx, panel, K, scale, out, ldo, cols);
    default: return tile<1>(x, ldx, panel, K, scale, out, ldo, cols);
  }
}

// Every row tile of x [M, K] against one panel, of int8 or fp32 weights.
template <typename W>
void panel_rows(const float* x, int64_t ldx, int64_t M, const W* panel, int64_t K,
                const float* scale, float* out, int64_t ldo, int64_t cols) {
  for (int64_t m = 0; m < M; m += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m));
    run_tile(rows, x + m * ldx, ldx, panel, K, scale, out + m * ldo, ldo, cols);
  }
}

#undef PALM_TILE_UNROLL

}  // namespace panel_tile
}  // namespace palm_cpu
