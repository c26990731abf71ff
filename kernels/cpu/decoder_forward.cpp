// The serving forward of a decoder on the CPU as ONE call: the embedding, every block and the
// final norm, run by one OpenMP team from start to end with a barrier between phases. Two
// block kinds: PaLM's parallel block (LayerNorm; attention and SwiGLU feed-forward off one
// fused projection, summed into one residual) and Llama's sequential one (RMSNorm; the
// attention residual, then the feed-forward's). Its oracle is DecoderModel.forward over the
// same kernels (tests/model/test_fused_forward.py).
//
// Why: at decode batch sizes a small model's linears take tens of microseconds each, and the
// compiled step (model/compiled.py) spent about a quarter of the main thread between them:
// Python, the dispatcher's boxed calls, allocations, one OpenMP region per op, while the
// other thread waited (docs/BENCHMARKS.md). Here the thread that called runs the same phases
// as the others; a phase waits only on the slowest thread's share of the one before.
//
// Phases of a block (T tokens), each ended by a barrier:
//   1. h = norm(x) per row (the first block's x is the embedding's rows);
//   2. y = h @ qkv (PaLM's fused projection also gives the feed-forward's a | gate), in
//      chunks of the panel linear (panel_linear.h);
//   3. per token: rotary on y's q and k, k and v into the block's cache; PaLM: s = silu(gate) * a;
//   4. the attention's units over the cache (paged_attention.h), into o;
//   PaLM:  5. x = x + (o @ attn_out + s @ ff_out), chunk by chunk of the outputs;
//   Llama: 5. x = x + o @ attn_out;  6. h = norm2(x);  7. g = h @ ff_in (gate | up);
//          8. s = silu(gate) * up;   9. x = x + s @ ff_out.
// The linears, rotary, cache write and attention are the ops' own code, so they agree with
// the ops bit for bit; the norms and SiLU here differ from torch's in rounding only.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "paged_attention.h"
#include "panel_linear.h"
#include "panels.h"
#include "rotary_rows.h"
#include "vec.h"

namespace palm_cpu {
namespace {

// y = (x - mean) / sqrt(var + eps) * w over one row of n, in fp32, as F.layer_norm without bias.
void layer_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  int64_t i = 0;
  float sum = 0.f;
#if PALM_CPU_AVX2
  __m256 vsum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(x + i));
  sum = hsum(vsum);
#endif
  for (; i < n; ++i) sum += x[i];
  const float mean = sum / float(n);
  float squares = 0.f;
  i = 0;
#if PALM_CPU_AVX2
  const __m256 vmean = _mm256_set1_ps(mean);
  __m256 vsq = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vmean);
    vsq = _mm256_add_ps(vsq, _mm256_mul_ps(d, d));
  }
  squares = hsum(vsq);
#endif
  for (; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / std::sqrt(squares / float(n) + eps);
  for (i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i];
}

// y = w * (x / sqrt(mean(x^2) + eps)) over one row of n, as the Llama twin's RMSNorm in fp32.
void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  int64_t i = 0;
  float squares = 0.f;
#if PALM_CPU_AVX2
  __m256 vsq = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vsq = _mm256_add_ps(vsq, _mm256_mul_ps(v, v));
  }
  squares = hsum(vsq);
#endif
  for (; i < n; ++i) squares += x[i] * x[i];
  const float r = 1.f / std::sqrt(squares / float(n) + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

enum class Block { kParallel, kSequential };

void norm_row(Block block, const float* x, const float* w, int64_t n, float eps, float* y) {
  if (block == Block::kParallel)
    layer_norm_row(x, w, n, eps, y);
  else
    rms_norm_row(x, w, n, eps, y);
}

// out = silu(gate) * a over n, silu(g) = g / (1 + e^-g).
void silu_mul_row(const float* a, const float* gate, int64_t n, float* out) {
  int64_t i = 0;
#if PALM_CPU_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(a + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * a[i];
}

// The call's scratch buffers, carved from one block: the calling thread's own, kept between
// calls up to kRetainedFloats (a decode step's, so that steady decoding allocates nothing and
// touches no fresh pages), else allocated for the call alone (a long prefill's). take(n)
// reserves n floats and returns their offset; data(offset), once allocate() has run, their
// address.
class Workspace {
 public:
  int64_t take(int64_t n) {
    const int64_t offset = size_;
    size_ += (n + kAlign - 1) / kAlign * kAlign;  // 64-byte multiples, against false sharing
    return offset;
  }
  void allocate() {
    if (size_ <= kRetainedFloats) {
      thread_local std::vector<float> kept;
      if (int64_t(kept.size()) < size_) kept.resize(size_);
      base_ = kept.data();
    } else {
      own_.resize(size_);
      base_ = own_.data();
    }
  }
  float* data(int64_t offset) const { return base_ + offset; }

 private:
  static constexpr int64_t kAlign = 16;               // floats: a 64-byte line
  static constexpr int64_t kRetainedFloats = 1 << 20;  // 4 MiB
  int64_t size_ = 0;
  float* base_ = nullptr;
  std::vector<float> own_;
};

using WriteToken = void (*)(const Rows<float>&, const Rows<float>&, void*, void*, int64_t,
                            int64_t, int64_t);

template <typename C>
void write_token_to(const Rows<float>& k, const Rows<float>& v, void* k_cache, void* v_cache,
                    int64_t t, int64_t slot, int64_t dim) {
  write_token(k, v, static_cast<C*>(k_cache), static_cast<C*>(v_cache), t, slot, dim);
}

WriteToken token_writer(at::ScalarType cache_dtype) {
  switch (cache_dtype) {
    case at::kFloat:
      return &write_token_to<float>;
    case at::kHalf:
      return &write_token_to<c10::Half>;
    case at::kBFloat16:
      return &write_token_to<c10::BFloat16>;
    default:
      TORCH_CHECK(false, "decoder_forward: the caches must be float32, float16 or bfloat16, not ",
                  cache_dtype);
  }
  return nullptr;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

void check_panels(const at::Tensor& panels, int64_t k, int64_t n, const char* name) {
  check_float(panels, name);
  TORCH_CHECK(panels.dim() == 3 && panels.size(0) == (n + kPanel - 1) / kPanel &&
                  panels.size(1) == k && panels.size(2) == kPanel,
              name, " must be the panels (pack_panels) of a [", n, ", ", k, "] weight, got ",
              panels.sizes());
}

void check_ids(const at::Tensor& ids, int64_t vocab) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  ids.dim() == 1,
              "input_ids must be contiguous int64 [T]");
  const int64_t* p = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < vocab, "input id ", p[i], " outside [0, ", vocab, ")");
}

// The residual over a chunk's region of the [T, dim] outputs: x = x + a, or x = x + (a + b)
// where there is a second part (PaLM's two branches, summed before the residual as its block
// sums them).
void add_region(const PanelLinearWork& linear, int64_t chunk, const float* a, const float* b,
                float* x) {
  int64_t m0, rows, n0, cols;
  linear.region(chunk, &m0, &rows, &n0, &cols);
  for (int64_t m = m0; m < m0 + rows; ++m)
    for (int64_t n = n0; n < n0 + cols; ++n) {
      const int64_t i = m * linear.ldo + n;
      x[i] = x[i] + (b ? a[i] + b[i] : a[i]);
    }
}

at::Tensor decoder_forward(const at::Tensor& input_ids, const at::Tensor& positions,
                           const at::Tensor& embedding, at::TensorList norms, at::TensorList qkv,
                           at::TensorList attn_out, at::TensorList ff_in, at::TensorList ff_out,
                           at::TensorList k_caches, at::TensorList v_caches,
                           const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                           const at::Tensor& cos_sin, const std::optional<at::Tensor>& xpos,
                           int64_t heads, int64_t kv_heads, int64_t ff_inner, double scale,
                           double eps, c10::string_view block_kind) {
  TORCH_CHECK(block_kind == "parallel" || block_kind == "sequential",
              "block must be 'parallel' (PaLM) or 'sequential' (Llama)");
  const Block block = block_kind == "parallel" ? Block::kParallel : Block::kSequential;
  const bool parallel = block == Block::kParallel;
  check_float(embedding, "embedding");
  TORCH_CHECK(embedding.dim() == 2 && cos_sin.dim() == 2,
              "embedding must be [V, dim], cos_sin [P, head_dim]");
  const int64_t T = input_ids.numel(), V = embedding.size(0), dim = embedding.size(1);
  const int64_t D = cos_sin.size(1), depth = int64_t(qkv.size());
  // y: q | k | v, and for PaLM the feed-forward's a | gate after them
  const int64_t qkv_width = (heads + 2 * kv_heads) * D;
  const int64_t width = parallel ? qkv_width + 2 * ff_inner : qkv_width;
  TORCH_CHECK(heads > 0 && kv_heads > 0 && ff_inner > 0, "heads, kv_heads, ff_inner must be > 0");
  const int64_t norms_per_block = parallel ? 1 : 2;
  TORCH_CHECK(depth > 0 && int64_t(norms.size()) == norms_per_block * depth + 1 &&
                  int64_t(attn_out.size()) == depth && int64_t(ff_out.size()) == depth &&
                  int64_t(ff_in.size()) == (parallel ? 0 : depth) &&
                  int64_t(k_caches.size()) == depth && int64_t(v_caches.size()) == depth,
              "per block: qkv, attn_out, ff_out, k and v caches, and its norms (PaLM 1, Llama "
              "2, and ff_in); then the final norm");
  check_ids(input_ids, V);
  const Rotary rotary = check_rotary(T, D, positions, cos_sin, xpos);
  const at::Tensor& cache0 = k_caches[0];
  TORCH_CHECK(cache0.dim() == 4 && cache0.size(2) == kv_heads && cache0.size(3) == D,
              "the caches must be [NB, BS, kv_heads, head_dim]");
  std::vector<float*> k_data(depth), v_data(depth);
  std::vector<const float*> norm_w(norms.size()), qkv_w(depth), attn_w(depth), ff_in_w(depth),
      ff_out_w(depth);
  for (int64_t l = 0; l < depth; ++l) {
    for (const at::Tensor* c : {&k_caches[l], &v_caches[l]})
      TORCH_CHECK(c->device().is_cpu() && c->is_contiguous() && c->sizes() == cache0.sizes() &&
                      c->scalar_type() == cache0.scalar_type(),
                  "every layer's caches must be contiguous CPU tensors of one shape and dtype");
    k_data[l] = static_cast<float*>(k_caches[l].data_ptr());
    v_data[l] = static_cast<float*>(v_caches[l].data_ptr());
    check_panels(qkv[l], dim, width, "qkv");
    check_panels(attn_out[l], heads * D, dim, "attn_out");
    check_panels(ff_out[l], ff_inner, dim, "ff_out");
    qkv_w[l] = qkv[l].const_data_ptr<float>();
    attn_w[l] = attn_out[l].const_data_ptr<float>();
    ff_out_w[l] = ff_out[l].const_data_ptr<float>();
    if (!parallel) {
      check_panels(ff_in[l], dim, 2 * ff_inner, "ff_in");
      ff_in_w[l] = ff_in[l].const_data_ptr<float>();
    }
  }
  for (size_t i = 0; i < norms.size(); ++i) {
    check_float(norms[i], "norm");
    TORCH_CHECK(norms[i].numel() == dim, "every norm weight must have dim entries");
    norm_w[i] = norms[i].const_data_ptr<float>();
  }
  const int64_t block_size = cache0.size(1);
  check_slots(slot_mapping, T, cache0.size(0) * block_size);
  const WriteToken write = token_writer(cache0.scalar_type());

  const at::TensorOptions options = embedding.options();
  at::Tensor out = at::empty({T, dim}, options);
  if (T == 0) return out;
  const int threads = at::get_num_threads();
  const PagedAttentionWork attention(block_tables, query_start_loc, context_lens, T, heads,
                                     kv_heads, D, block_size, cache0.size(0),
                                     cache0.scalar_type(), scale, width, D, threads, depth);
  // x: the residual stream; h: its norm; y: the projection; o: the attention's output;
  // g: Llama's gate | up; s: silu(gate) * a; a_part, f_part: the output linears'.
  Workspace space;
  const int64_t x_at = space.take(T * dim), h_at = space.take(T * dim);
  const int64_t y_at = space.take(T * width), o_at = space.take(T * heads * D);
  const int64_t g_at = space.take(parallel ? 0 : T * 2 * ff_inner);
  const int64_t s_at = space.take(T * ff_inner);
  const int64_t a_at = space.take(T * dim), f_at = space.take(T * dim);
  space.allocate();
  float* xp = space.data(x_at);
  float* hp = space.data(h_at);
  float* yp = space.data(y_at);
  float* op = space.data(o_at);
  float* gp = space.data(g_at);
  float* sp = space.data(s_at);
  float* ap = space.data(a_at);
  float* fp = space.data(f_at);
  const int64_t* ids = input_ids.const_data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const float* emb = embedding.const_data_ptr<float>();
  float* outp = out.mutable_data_ptr<float>();
  const Rows<float> q_rows(yp, heads, width, D), k_rows(yp + heads * D, kv_heads, width, D),
      v_rows(yp + (heads + kv_heads) * D, kv_heads, width, D);
  const float epsilon = float(eps);
  const int64_t attention_units = attention.units();

#pragma omp parallel
  {
    for (int64_t l = 0; l < depth; ++l) {
      const float* norm = norm_w[norms_per_block * l];
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        if (l == 0) std::copy_n(emb + ids[t] * dim, dim, xp + t * dim);
        norm_row(block, xp + t * dim, norm, dim, epsilon, hp + t * dim);
      }
      const PanelLinearWork projection{hp, dim, T, dim, width, qkv_w[l], yp, width};
      const int64_t projection_chunks = projection.chunks();
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < projection_chunks; ++c) projection.run(c);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t pos = rotary.positions[t];
        for (int64_t i = 0; i < heads; ++i) rotate_row(q_rows.row(t, i), rotary, pos, false);
        for (int64_t i = 0; i < kv_heads; ++i) rotate_row(k_rows.row(t, i), rotary, pos, true);
        if (slots[t] >= 0) write(k_rows, v_rows, k_data[l], v_data[l], t, slots[t], D);
        if (parallel) {  // a first, then the gate
          const float* ff = yp + t * width + qkv_width;
          silu_mul_row(ff, ff + ff_inner, ff_inner, sp + t * ff_inner);
        }
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < attention_units; ++u)
        attention.run(l, u, yp, k_data[l], v_data[l], op);
      const PanelLinearWork attn_linear{op, heads * D, T, heads * D, dim, attn_w[l], ap, dim};
      const PanelLinearWork ff_linear{sp, ff_inner, T, ff_inner, dim, ff_out_w[l], fp, dim};
      const int64_t output_chunks = attn_linear.chunks();  // ff_linear's too: same M and N
      if (parallel) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < output_chunks; ++c) {
          attn_linear.run(c);
          ff_linear.run(c);
          add_region(attn_linear, c, ap, fp, xp);
        }
        continue;
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < output_chunks; ++c) {
        attn_linear.run(c);
        add_region(attn_linear, c, ap, nullptr, xp);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t)
        norm_row(block, xp + t * dim, norm_w[2 * l + 1], dim, epsilon, hp + t * dim);
      const PanelLinearWork gate_up{hp, dim, T, dim, 2 * ff_inner, ff_in_w[l], gp, 2 * ff_inner};
      const int64_t gate_up_chunks = gate_up.chunks();
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < gate_up_chunks; ++c) gate_up.run(c);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {  // the gate first, then up
        const float* gu = gp + t * 2 * ff_inner;
        silu_mul_row(gu + ff_inner, gu, ff_inner, sp + t * ff_inner);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < output_chunks; ++c) {
        ff_linear.run(c);
        add_region(ff_linear, c, fp, nullptr, xp);
      }
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      norm_row(block, xp + t * dim, norm_w[norms.size() - 1], dim, epsilon, outp + t * dim);
  }
  return out;
}

}  // namespace
}  // namespace palm_cpu

TORCH_LIBRARY_FRAGMENT(palm_cpu, m) {
  m.def("decoder_forward(Tensor input_ids, Tensor positions, Tensor embedding, Tensor[] norms, "
        "Tensor[] qkv, Tensor[] attn_out, Tensor[] ff_in, Tensor[] ff_out, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping, "
        "Tensor block_tables, Tensor query_start_loc, Tensor context_lens, Tensor cos_sin, "
        "Tensor? xpos, int heads, int kv_heads, int ff_inner, float scale, float eps, "
        "str block) -> Tensor");
}

TORCH_LIBRARY_IMPL(palm_cpu, CPU, m) {
  m.impl("decoder_forward", &palm_cpu::decoder_forward);
}
