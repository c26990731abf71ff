// The paged attention (paged_attention.cpp) as units of work that any thread may take in any
// order, for a caller that runs its own thread team (decoder_forward.cpp). The units depend on
// the batch (its block tables, query starts and context lengths) and not on the layer, so
// they are planned once and run for every layer. A unit computes what its items do in
// torch.ops.palm_cpu.paged_attention, so the two agree bit for bit.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

namespace palm_cpu {

class PagedAttentionWork {
 public:
  // q rows [T, heads, dim] at the given strides (fp32), the caches [NB, BS, kv_heads, dim]
  // of cache_dtype (fp32, or 16-bit), layers of them. Checks the tables against the cache
  // (TORCH_CHECK) before anything reads through them.
  PagedAttentionWork(const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                     const at::Tensor& context_lens, int64_t num_tokens, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t block_size, int64_t num_blocks,
                     at::ScalarType cache_dtype, double scale, int64_t q_token_stride,
                     int64_t q_head_stride, int threads, int64_t layers);
  ~PagedAttentionWork();

  // Units of work: each runs the items of one (sequence, query rows, context split) for
  // every K/V head, so that one thread reads whole cache blocks.
  int64_t units() const;
  // Unit u of one layer: out [T, heads, dim], contiguous. Every unit of a layer must run
  // before a layer that reuses its scratch (the team's barrier between layers).
  void run(int64_t layer, int64_t unit, const float* q, const void* k_cache, const void* v_cache,
           float* out) const;

 private:
  struct Plan;
  std::unique_ptr<Plan> plan_;
};

}  // namespace palm_cpu
