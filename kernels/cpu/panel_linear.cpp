// The fp32 linear of the CPU path: y [M, N] = x [M, K] @ w [N, K].T, with the weight packed
// once, at load, in panels of 16 output channels. Its oracle is torch's x @ w.T
// (tests/kernels/test_cpu_panel_linear.py). Where the CPU has AVX-512 the tiles below run;
// elsewhere panel_tile.h's AVX2 tile (6 rows x one panel), as in the int8 linear.
//
// Why not oneDNN's prepacked linear (model/cpu_linear.py keeps it where this kernel does not
// run): at decode batch sizes a linear streams its whole weight from memory for a few rows
// of x, and oneDNN reached 13-22 GB/s there while this kernel, which reads each weight
// panel once for all the rows and keeps them in registers, reaches 19-40 GB/s on the same
// machine (docs/BENCHMARKS.md). At prefill sizes the two are level. The AVX2 tile beat oneDNN
// in the same way on an AVX2-only CPU (docs/BENCHMARKS.md).
//
// Packed layout (pack_panels): [ceil(N / 16), K, 16] fp32, N padded with zero channels, so
// one k step of a panel is one 64-byte line, one zmm register. The micro-kernel is a tile of
// up to kRows = 6 rows of x by kGroup = 4 panels (64 channels): 24 accumulators, and per k
// four weight loads and six broadcasts feed 24 FMAs. Threads split the groups of panels.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "claimed_work.h"
#include "isa.h"
#include "panel_linear.h"
#include "panel_tile.h"
#include "panels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PALM_PANEL_AVX512 1
#else
#define PALM_PANEL_AVX512 0
#endif

namespace palm_cpu {
namespace {

constexpr int kRows = 6;        // rows of x per tile
constexpr int kGroup = 4;       // panels per tile
// Rows of x per pass over a thread's panels (a multiple of kRows): a block of x stays in L2
// while the panels pass over it, instead of all of x streaming from L3 once per group (at
// prefill sizes that traffic outweighed reading the panels once per block).
constexpr int64_t kRowBlock = 96;
constexpr int64_t kPanelsPerChunk = 4;  // the AVX2 path's unit of work: 128 KB at K = 512

#if PALM_PANEL_AVX512
// Only these functions use AVX-512; the rest of the library is built for AVX2, and they run
// only once avx512_enabled() said yes.
#pragma GCC push_options
#pragma GCC target("avx512f")

// Unrolled so that the accumulator array lives in registers.
#define PALM_UNROLL _Pragma("GCC unroll 24")

// ROWS rows of x (row stride ldx) against PANELS consecutive panels (panel stride ps):
// out[r][0, 16 * PANELS) = x[r] . panels, the last panel's store cut to last_cols.
template <int ROWS, int PANELS>
void tile(const float* x, int64_t ldx, const float* panel, int64_t ps, int64_t K, float* out,
          int64_t ldo, int last_cols) {
  __m512 acc[ROWS][PANELS];
  PALM_UNROLL for (int r = 0; r < ROWS; ++r)
    PALM_UNROLL for (int j = 0; j < PANELS; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[PANELS];
    PALM_UNROLL for (int j = 0; j < PANELS; ++j) w[j] = _mm512_loadu_ps(panel + j * ps + k * kPanel);
    PALM_UNROLL for (int r = 0; r < ROWS; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      PALM_UNROLL for (int j = 0; j < PANELS; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  const __mmask16 last = static_cast<__mmask16>((1u << last_cols) - 1);
  PALM_UNROLL for (int r = 0; r < ROWS; ++r)
    PALM_UNROLL for (int j = 0; j < PANELS; ++j)
      _mm512_mask_storeu_ps(out + r * ldo + j * kPanel, j == PANELS - 1 ? last : __mmask16(0xFFFF),
                            acc[r][j]);
}

template <int PANELS>
void tile_rows(int rows, const float* x, int64_t ldx, const float* panel, int64_t ps, int64_t K,
               float* out, int64_t ldo, int last_cols) {
  switch (rows) {
    case 6: return tile<6, PANELS>(x, ldx, panel, ps, K, out, ldo, last_cols);
    case 5: return tile<5, PANELS>(x, ldx, panel, ps, K, out, ldo, last_cols);
    case 4: return tile<4, PANELS>(x, ldx, panel, ps, K, out, ldo, last_cols);
    case 3: return tile<3, PANELS>(x, ldx, panel, ps, K, out, ldo, last_cols);
    case 2: return tile<2, PANELS>(x, ldx, panel, ps, K, out, ldo, last_cols);
    default: return tile<1, PANELS>(x, ldx, panel, ps, K, out, ldo, last_cols);
  }
}

// Every row tile of x [M, K] against the group of panels starting at `panel`.
void group_rows(int panels, const float* x, int64_t ldx, int64_t M, const float* panel,
                int64_t K, float* out, int64_t ldo, int last_cols) {
  const int64_t ps = K * kPanel;
  for (int64_t m = 0; m < M; m += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m));
    const float* xs = x + m * ldx;
    float* o = out + m * ldo;
    switch (panels) {
      case 4: tile_rows<4>(rows, xs, ldx, panel, ps, K, o, ldo, last_cols); break;
      case 3: tile_rows<3>(rows, xs, ldx, panel, ps, K, o, ldo, last_cols); break;
      case 2: tile_rows<2>(rows, xs, ldx, panel, ps, K, o, ldo, last_cols); break;
      default: tile_rows<1>(rows, xs, ldx, panel, ps, K, o, ldo, last_cols);
    }
  }
}

#undef PALM_UNROLL
#pragma GCC pop_options
#endif  // PALM_PANEL_AVX512

// weight [N, K] fp32 -> [ceil(N / 16), K, 16] fp32, padded channels zero.
at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight must be a [N, K] float32 CPU tensor, got ", weight.sizes(), " ",
              weight.scalar_type());
  return pack_in_panels<float>(weight);
}

bool panel_linear_supported() { return avx512_enabled() || PALM_CPU_AVX2; }

// x [M, K] fp32, panels [P, K, 16] fp32 from pack_panels -> [M, N].
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features) {
  TORCH_CHECK(panel_linear_supported(),
              "panel_linear needs a CPU with AVX-512F (or a build with AVX2 and FMA)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be a [M, K] float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat &&
                  panels.size(2) == kPanel && panels.is_contiguous(),
              "panels must be contiguous [P, K, 16] float32 (pack_panels)");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "x has K = ", K, ", the weight ", panels.size(1));
  TORCH_CHECK(N > (P - 1) * kPanel && N <= P * kPanel, "out_features ", N, " does not match ", P,
              " panels");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const at::Tensor x_rows = x.stride(1) == 1 ? x : x.contiguous();  // rows may be strided
  const float* xp = x_rows.const_data_ptr<float>();
  const float* wp = panels.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ldx = x_rows.stride(0);
#if PALM_PANEL_AVX512
  if (avx512_enabled()) {
    const int64_t groups = (P + kGroup - 1) / kGroup;
    // Static shares of the groups: at decode sizes (one row block) every thread streams its
    // share of the weight once.
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - m0);
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t p = g * kGroup;
          const int count = static_cast<int>(std::min<int64_t>(kGroup, P - p));
          const int last_cols = static_cast<int>(N - (p + count - 1) * kPanel);
          group_rows(count, xp + m0 * ldx, ldx, rows, wp + p * K * kPanel, K,
                     op + m0 * N + p * kPanel, N, std::min<int>(last_cols, kPanel));
        }
      }
    });
    return out;
  }
#endif
  // Chunks of (row block, panels), claimed (claimed_work.h): a thread preempted on a CPU
  // shared with the front or the client holds up the region's end by one chunk at most.
  const int64_t panel_chunks = (P + kPanelsPerChunk - 1) / kPanelsPerChunk;
  constexpr int64_t row_block = panel_tile::kRowBlock;
  const int64_t chunks = (M + row_block - 1) / row_block * panel_chunks;
  parallel_claim(chunks, [&](int64_t c) {
    const int64_t m0 = c / panel_chunks * row_block, p0 = c % panel_chunks * kPanelsPerChunk;
    const int64_t rows = std::min(row_block, M - m0);
    for (int64_t p = p0; p < std::min(P, p0 + kPanelsPerChunk); ++p)
      panel_tile::panel_rows(xp + m0 * ldx, ldx, rows, wp + p * K * kPanel, K, nullptr,
                             op + m0 * N + p * kPanel, N, std::min(kPanel, N - p * kPanel));
  });
  return out;
}

}  // namespace

// The AVX-512 path's chunk: a row block by a group of kGroup panels; the AVX2 path's: a row
// block by kPanelsPerChunk panels. Both are four panels.
static_assert(kGroup == kPanelsPerChunk);

namespace {
int64_t chunk_rows() {
#if PALM_PANEL_AVX512
  if (avx512_enabled()) return kRowBlock;
#endif
  return panel_tile::kRowBlock;
}
}  // namespace

int64_t PanelLinearWork::chunks() const {
  const int64_t P = (N + kPanel - 1) / kPanel;
  return (M + chunk_rows() - 1) / chunk_rows() * ((P + kGroup - 1) / kGroup);
}

void PanelLinearWork::region(int64_t chunk, int64_t* m0, int64_t* rows, int64_t* n0,
                             int64_t* cols) const {
  const int64_t P = (N + kPanel - 1) / kPanel, groups = (P + kGroup - 1) / kGroup;
  *m0 = chunk / groups * chunk_rows();
  *rows = std::min(chunk_rows(), M - *m0);
  *n0 = chunk % groups * kGroup * kPanel;
  *cols = std::min(kGroup * kPanel, N - *n0);
}

void PanelLinearWork::run(int64_t chunk) const {
  int64_t m0, rows, n0, cols;
  region(chunk, &m0, &rows, &n0, &cols);
  const int64_t p0 = n0 / kPanel, count = (cols + kPanel - 1) / kPanel;
#if PALM_PANEL_AVX512
  if (avx512_enabled()) {
    const int last_cols = static_cast<int>(cols - (count - 1) * kPanel);
    group_rows(static_cast<int>(count), x + m0 * ldx, ldx, rows, panels + p0 * K * kPanel, K,
               out + m0 * ldo + n0, ldo, last_cols);
    return;
  }
#endif
  for (int64_t p = p0; p < p0 + count; ++p)
    panel_tile::panel_rows(x + m0 * ldx, ldx, rows, panels + p * K * kPanel, K, nullptr,
                           out + m0 * ldo + p * kPanel, ldo, std::min(kPanel, N - p * kPanel));
}

}  // namespace palm_cpu

TORCH_LIBRARY_FRAGMENT(palm_cpu, m) {
  m.def("pack_panels(Tensor weight) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, int out_features) -> Tensor");
  m.def("panel_linear_supported() -> bool", &palm_cpu::panel_linear_supported);  // no tensors
}

TORCH_LIBRARY_IMPL(palm_cpu, CPU, m) {
  m.impl("pack_panels", &palm_cpu::pack_panels);
  m.impl("panel_linear", &palm_cpu::panel_linear);
}
