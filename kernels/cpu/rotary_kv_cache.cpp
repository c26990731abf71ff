// Rotary embedding (RoFormer, arXiv:2104.09864; optional xPos, arXiv:2212.10554) and the
// KV-cache write on the CPU, separately or fused into one pass over the tokens: the
// siblings of kernels/rotary.py and kernels/kv_cache.py, and equal to them bit for bit.
//
// The twins compute out1 = x1 * cos - x2 * sin and out2 = x2 * cos + x1 * sin in fp32, each
// product rounded, then scale by the xPos factor (k by 1 / factor); build.py compiles with
// -ffp-contract=off so that the compiler does not fuse those products into FMAs either.
// The caches have k's dtype, or under an fp32 k a 16-bit one (the server's
// --kv-cache-dtype): k and v are then rounded to nearest even, as the twin's .to() does.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "rotary_rows.h"
#include "vec.h"

namespace palm_cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // below this much work, no thread wake-up

// Either part may be absent: rotary without q (none), or the write without caches. q, k and
// v of T, the caches of C.
template <typename T, typename C>
void run(const std::optional<Rows<T>>& q, const Rows<T>& k, const std::optional<Rows<T>>& v,
         C* k_cache, C* v_cache, const int64_t* slots, const std::optional<Rotary>& rotary,
         int64_t num_tokens, int64_t dim) {
  const int64_t per_token = (q ? q->heads : 0) * dim + 2 * k.heads * dim;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, per_token));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (rotary) {
        const int64_t pos = rotary->positions[t];
        for (int64_t h = 0; h < q->heads; ++h) rotate_row(q->row(t, h), *rotary, pos, false);
        for (int64_t h = 0; h < k.heads; ++h) rotate_row(k.row(t, h), *rotary, pos, true);
      }
      if (v && slots[t] >= 0) write_token(k, *v, k_cache, v_cache, t, slots[t], dim);
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1,
              name, " must be [T, heads, D] on the CPU with a contiguous last dimension");
  TORCH_CHECK(x.scalar_type() == like.scalar_type() && x.size(0) == like.size(0) &&
                  x.size(2) == like.size(2),
              name, " must match k in dtype, tokens and head_dim");
}

void check_cache(const at::Tensor& k, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [NB, BS, Hkv, D] of one shape");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == k.scalar_type() || k.scalar_type() == at::kFloat),
              "the caches must share one dtype: k's, or under an fp32 k a 16-bit one");
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "k's [Hkv, D] must match the caches'");
  check_slots(slots, k.size(0), k_cache.size(0) * k_cache.size(1));
}

template <typename Fn>
void dispatch(const at::Tensor& x, Fn&& fn) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "k and the caches must be float32, float16 or bfloat16, not ",
                  x.scalar_type());
  }
}

// fn(k's type, the caches' type): the two cases check_cache leaves.
template <typename Fn>
void dispatch_write(const at::Tensor& k, const at::Tensor& k_cache, Fn&& fn) {
  if (k.scalar_type() == k_cache.scalar_type())
    return dispatch(k, [&](auto zero) { fn(zero, zero); });
  dispatch(k_cache, [&](auto cache_zero) { fn(float{}, cache_zero); });
}

void rotary_write_kv_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& positions, const at::Tensor& slot_mapping,
                           const at::Tensor& cos_sin_cache,
                           const std::optional<at::Tensor>& xpos_scale_cache) {
  check_rows(k, k, "k");
  check_rows(q, k, "q");
  check_rows(v, k, "v");
  TORCH_CHECK(v.size(1) == k.size(1), "v must have k's K/V heads");
  check_cache(k, k_cache, v_cache, slot_mapping);
  const Rotary rotary =
      check_rotary(k.size(0), k.size(2), positions, cos_sin_cache, xpos_scale_cache);
  dispatch_write(k, k_cache, [&](auto zero, auto cache_zero) {
    using T = decltype(zero);
    using C = decltype(cache_zero);
    run<T, C>(Rows<T>(q), Rows<T>(k), Rows<T>(v), k_cache.data_ptr<C>(), v_cache.data_ptr<C>(),
              slot_mapping.const_data_ptr<int64_t>(), rotary, k.size(0), k.size(2));
  });
}

void rotary_embedding(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      const at::Tensor& cos_sin_cache,
                      const std::optional<at::Tensor>& xpos_scale_cache) {
  check_rows(k, k, "k");
  check_rows(q, k, "q");
  const Rotary rotary =
      check_rotary(k.size(0), k.size(2), positions, cos_sin_cache, xpos_scale_cache);
  dispatch(k, [&](auto zero) {
    using T = decltype(zero);
    run<T, T>(Rows<T>(q), Rows<T>(k), std::nullopt, nullptr, nullptr, nullptr, rotary,
              k.size(0), k.size(2));
  });
}

void write_kv_cache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_rows(k, k, "k");
  check_rows(v, k, "v");
  TORCH_CHECK(v.size(1) == k.size(1), "v must have k's K/V heads");
  check_cache(k, k_cache, v_cache, slot_mapping);
  dispatch_write(k, k_cache, [&](auto zero, auto cache_zero) {
    using T = decltype(zero);
    using C = decltype(cache_zero);
    run<T, C>(std::nullopt, Rows<T>(k), Rows<T>(v), k_cache.data_ptr<C>(),
              v_cache.data_ptr<C>(), slot_mapping.const_data_ptr<int64_t>(), std::nullopt,
              k.size(0), k.size(2));
  });
}

}  // namespace
}  // namespace palm_cpu

TORCH_LIBRARY_FRAGMENT(palm_cpu, m) {
  m.def("rotary_embedding(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache, "
        "Tensor? xpos_scale_cache) -> ()");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  m.def("rotary_write_kv_cache(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor(c!) k_cache, "
        "Tensor(d!) v_cache, Tensor positions, Tensor slot_mapping, Tensor cos_sin_cache, "
        "Tensor? xpos_scale_cache) -> ()");
}

TORCH_LIBRARY_IMPL(palm_cpu, CPU, m) {
  m.impl("rotary_embedding", &palm_cpu::rotary_embedding);
  m.impl("write_kv_cache", &palm_cpu::write_kv_cache);
  m.impl("rotary_write_kv_cache", &palm_cpu::rotary_write_kv_cache);
}
