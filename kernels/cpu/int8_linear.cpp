// Weight-only int8 linear on the CPU: y [M, N] = x [M, K] @ (w [N, K] * scale [N]).T, with
// fp32 activations. The sibling of the Triton kernel; the torch twin
// (kernels/int8_linear.py: dequantize, then matmul) is its oracle.
//
// The int8 weights are read directly and widened to fp32 in registers (no fp32 copy of the
// weight is ever written): at decode batch sizes the linear streams its weight once, so a
// quarter of fp32's bytes is what int8 buys. Products accumulate in fp32 and the
// per-channel scale is applied once per output, at the end.
//
// Packed layout (pack_int8_weight): panels of kPanel = 16 output channels, each [K][16]
// int8, so one k step of a panel is 16 contiguous bytes (two 8-lane fp32 vectors after
// widening). N is padded to a multiple of 16 with zero channels. The micro-kernel is a tile
// of up to kRows = 6 rows x 16 channels (12 accumulators); the panel (K x 16 bytes, 8 KiB
// at K = 512) stays in L1 while every row tile of x passes over it. Threads split the
// panels (OpenMP through at::parallel_for).
//
// With many rows (kWidenOnceRows or more) widening the same panel once per row tile costs
// more than the multiplies: the panel is then widened once into an fp32 copy (K x 64
// bytes, in L2) that every row tile reads. Same products, same order: a row's result does
// not depend on which path ran. Rows go in blocks of panel_tile::kRowBlock, so a block of x
// stays in L2 while the thread's panels pass over it (not the whole of x once per panel).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "panel_tile.h"
#include "panels.h"

namespace palm_cpu {
namespace {

constexpr int64_t kWidenOnceRows = 12;

// weight [N, K] int8 -> [ceil(N / 16), K, 16] int8, padded channels zero.
at::Tensor pack_int8_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar,
              "weight must be [N, K] int8, got ", weight.sizes(), " ", weight.scalar_type());
  return pack_in_panels<int8_t>(weight);
}

// x [M, K] fp32 (last dimension contiguous), packed [P, K, 16] int8, scales [P * 16] fp32
// (padded like the panels) -> [M, N] fp32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "x must be [M, K] float32 with a contiguous last dimension");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kChar && packed.size(2) == kPanel &&
                  packed.is_contiguous(),
              "packed must be contiguous [panels, K, 16] int8 (pack_int8_weight)");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x has K = ", K, ", the weight ", packed.size(1));
  TORCH_CHECK(panels * kPanel >= N && N > (panels - 1) * kPanel, "out_features ", N,
              " does not match ", panels, " panels");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == panels * kPanel,
              "scales must be contiguous float32 [", panels * kPanel, "]");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const bool widen_once = M >= kWidenOnceRows;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(widen_once ? K * kPanel : 0);
    // Rows in blocks that stay in L2 while this thread's panels pass over them.
    for (int64_t m0 = 0; m0 < M; m0 += panel_tile::kRowBlock) {
      const int64_t rows = std::min(panel_tile::kRowBlock, M - m0);
      const float* x_block = xp + m0 * ldx;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t cols = std::min(kPanel, N - p * kPanel);
        const int8_t* panel = wp + p * K * kPanel;
        float* o = op + m0 * N + p * kPanel;
        if (widen_once) {
          std::copy(panel, panel + K * kPanel, wide.begin());  // int8 -> float, exact
          panel_tile::panel_rows(x_block, ldx, rows, wide.data(), K, sp + p * kPanel, o, N, cols);
        } else {
          panel_tile::panel_rows(x_block, ldx, rows, panel, K, sp + p * kPanel, o, N, cols);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace palm_cpu

TORCH_LIBRARY_FRAGMENT(palm_cpu, m) {
  m.def("pack_int8_weight(Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(palm_cpu, CPU, m) {
  m.impl("pack_int8_weight", &palm_cpu::pack_int8_weight);
  m.impl("int8_linear", &palm_cpu::int8_linear);
}
