// One token's rotary embedding and KV-cache write, row by row: what rotary_kv_cache.cpp runs
// over a batch's tokens and decoder_forward.cpp runs inside its thread team; and the checks
// of their tables and slots, which both run before anything is read through them. Equal to
// the twins (kernels/rotary.py, kernels/kv_cache.py) bit for bit: each product is rounded as
// in torch (build.py compiles with -ffp-contract=off, so no FMA the source does not ask for).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "vec.h"

namespace palm_cpu {

struct Rotary {
  const float* cos_sin;  // [P, D]: cos of the half-dim frequencies, then their sin
  const float* xpos;     // [P, D/2] or null
  const int64_t* positions;
  int64_t dim;
};

// Rotates one head's row x [D] at position pos in place; inverse: k's 1 / xPos factor.
template <typename T>
inline void rotate_row(T* x, const Rotary& r, int64_t pos, bool inverse) {
  const int64_t half = r.dim / 2;
  const float* cos = r.cos_sin + pos * r.dim;
  const float* sin = cos + half;
  const float* scale = r.xpos ? r.xpos + pos * half : nullptr;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    float out1 = x1 * cos[i] - x2 * sin[i];
    float out2 = x2 * cos[i] + x1 * sin[i];
    if (scale) {
      const float s = inverse ? 1.f / scale[i] : scale[i];
      out1 *= s;
      out2 *= s;
    }
    x[i] = from_float<T>(out1);
    x[i + half] = from_float<T>(out2);
  }
}

// A [T, heads, D] tensor with a contiguous last dimension, any other strides.
template <typename T>
struct Rows {
  T* data;
  int64_t heads, token_stride, head_stride;
  explicit Rows(const at::Tensor& x)
      : data(x.data_ptr<T>()), heads(x.size(1)), token_stride(x.stride(0)),
        head_stride(x.stride(1)) {}
  Rows(T* data, int64_t heads, int64_t token_stride, int64_t head_stride)
      : data(data), heads(heads), token_stride(token_stride), head_stride(head_stride) {}
  T* row(int64_t t, int64_t h) const { return data + t * token_stride + h * head_stride; }
};

template <typename T, typename C>
inline void copy_row(const T* src, int64_t n, C* dst) {
  if constexpr (std::is_same_v<T, C>) {
    std::copy_n(src, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = from_float<C>(to_float(src[i]));
  }
}

template <typename T, typename C>
inline void write_token(const Rows<T>& k, const Rows<T>& v, C* k_cache, C* v_cache, int64_t t,
                        int64_t slot, int64_t dim) {
  const int64_t width = k.heads * dim;  // a slot's [Hkv, D], contiguous in the cache
  for (int64_t h = 0; h < k.heads; ++h) {
    copy_row(k.row(t, h), dim, k_cache + slot * width + h * dim);
    copy_row(v.row(t, h), dim, v_cache + slot * width + h * dim);
  }
}

// The rotary tables for num_tokens rows of head_dim dim at `positions`, each checked to lie
// inside them.
inline Rotary check_rotary(int64_t num_tokens, int64_t dim, const at::Tensor& positions,
                           const at::Tensor& cos_sin, const std::optional<at::Tensor>& xpos) {
  TORCH_CHECK(dim % 2 == 0, "rotary needs an even head_dim");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() &&
                  cos_sin.dim() == 2 && cos_sin.size(1) == dim,
              "cos_sin_cache must be contiguous fp32 [P, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == num_tokens,
              "positions must be contiguous int64 [T]");
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin.size(0), "position ", pos[t],
                " outside the rotary tables of ", cos_sin.size(0));
  const float* scale = nullptr;
  if (xpos) {
    TORCH_CHECK(xpos->scalar_type() == at::kFloat && xpos->is_contiguous() &&
                    xpos->dim() == 2 && xpos->size(0) == cos_sin.size(0) &&
                    xpos->size(1) == dim / 2,
                "xpos_scale_cache must be contiguous fp32 [P, head_dim / 2]");
    scale = xpos->const_data_ptr<float>();
  }
  return Rotary{cos_sin.const_data_ptr<float>(), scale, pos, dim};
}

// num_tokens slots, each -1 (not written) or inside a cache of num_slots.
inline void check_slots(const at::Tensor& slots, int64_t num_tokens, int64_t num_slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.numel() == num_tokens,
              "slot_mapping must be contiguous int64 [T]");
  const int64_t* s = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(s[t] >= -1 && s[t] < num_slots, "slot ", s[t], " outside the cache");
}

}  // namespace palm_cpu
