// The fp32 panel linear (panel_linear.cpp) as chunks of work that any thread may take in any
// order, for a caller that runs its own thread team (decoder_forward.cpp). A chunk computes the
// same tiles, in the same order, as the op torch.ops.palm_cpu.panel_linear, so the two agree
// bit for bit.
#pragma once

#include <cstdint>

namespace palm_cpu {

// out [M, N] (row stride ldo) = x [M, K] (row stride ldx) @ panels [ceil(N / 16), K, 16].
struct PanelLinearWork {
  const float* x;
  int64_t ldx, M, K, N;
  const float* panels;
  float* out;
  int64_t ldo;

  int64_t chunks() const;
  void run(int64_t chunk) const;
  // The rows [*m0, *m0 + *rows) and output columns [*n0, *n0 + *cols) a chunk writes.
  void region(int64_t chunk, int64_t* m0, int64_t* rows, int64_t* n0, int64_t* cols) const;
};

}  // namespace palm_cpu
