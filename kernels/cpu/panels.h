// Weights in panels: [ceil(N / 16), K, 16], the layout of the CPU linears that stream their
// weight once for all the rows of x (int8_linear.cpp, panel_linear.cpp). One k step of a
// panel is 16 consecutive output channels; N is padded with zero channels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <cstdint>

namespace palm_cpu {

constexpr int64_t kPanel = 16;  // output channels per panel

// weight [N, K] (checked by the caller) -> its panels, of the same dtype.
template <typename T>
at::Tensor pack_in_panels(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels, K, kPanel}, weight.options());
  const at::Tensor w = weight.contiguous();
  const T* src = w.const_data_ptr<T>();
  T* dst = packed.mutable_data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kPanel && p * kPanel + c < N; ++c)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kPanel + c] = src[(p * kPanel + c) * K + k];
  });
  return packed;
}

}  // namespace palm_cpu
