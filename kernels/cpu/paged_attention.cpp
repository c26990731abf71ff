// Varlen causal attention over the paged KV cache on the CPU: the sibling of the Triton
// kernel, with the torch twin (kernels/paged_attention.py) as its oracle.
//
// One call serves prefill chunks and decodes together. The work is a list of items, each
// (sequence, K/V head, tile of up to kRowTile query rows, context split): an item reads
// its keys and values in place through the block table, kKeyChunk tokens at a time, and
// each chunk serves every query row of the tile and all G = H / Hkv query heads that share
// the K/V head while it is in L1. A thread takes the items of every K/V head of one
// (sequence, tile, split) together, a unit, and so reads whole cache blocks. A long context
// is split when there are too few units to keep the threads busy; the split that finishes a
// task last merges its partial results.
// On a CPU with AVX-512 (head_dim 32, 64 or 128), a chunk step of all G heads at once replaces
// the per-head one (attention_avx512.h), and the tasks of 8 queries or more (prompt rows;
// decodes with 8+ heads to a K/V head) run as tiles with their queries in the vector lanes
// (attention_tile_avx512.h). Without AVX-512 the same tasks, of at most 32 queries (fewer rows
// to a task where G is large), run as tiles of eight lanes (attention_tile_avx2.h); the other
// tasks take each chunk with the G heads of a row together (attention_heads_avx2.h). The cache
// is q's dtype, or a 16-bit one under an fp32 q (the server's --kv-cache-dtype); the tiles and
// the AVX-512 row step read a 16-bit cache's chunks widened to fp32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <vector>

#include "attention_avx512.h"
#include "attention_heads_avx2.h"
#include "attention_tile_avx2.h"
#include "attention_tile_avx512.h"
#include "claimed_work.h"
#include "isa.h"
#include "paged_attention.h"
#include "vec.h"

namespace palm_cpu {
namespace {

constexpr int kRowTile = 8;         // query rows per item of a prefill chunk
constexpr int kKeyChunk = 32;       // keys (a multiple of 16) scored per softmax update
constexpr int kMinSplitKeys = 128;  // no context split shorter than this
constexpr int kUnitsPerThread = 4;  // target when splitting: room for dynamic balance
constexpr int kMinTileQueries = 8;  // the tile paths' smallest tile (queries)

struct Task {
  int32_t seq, kv_head;
  int32_t row0, rows;  // q rows [row0, row0 + rows) of the sequence
  int32_t pos0;        // position of row0; row r sees keys [0, pos0 + r]
  int32_t split_keys;  // keys per split (a multiple of kKeyChunk) ...
  int32_t splits;      // ... and the number of splits of [0, pos0 + rows)
  int64_t scratch;     // offset of its partials when split: splits x queries x (dim + 2)
};

struct Item {
  int32_t task, split;
};

struct Problem {
  int64_t heads, kv_heads, group, dim, block_size, table_width;
  const int32_t* tables;
  float scale;
  int64_t q_token_stride, q_head_stride;  // q may be a view of the fused projection
};

int64_t keys_of(const Task& t) { return t.pos0 + t.rows; }

// Tasks of up to row_tile query rows each.
std::vector<Task> make_tasks(const Problem& p, const int32_t* starts, const int32_t* lens,
                             int64_t num_seqs, int32_t row_tile) {
  std::vector<Task> tasks;
  for (int32_t s = 0; s < num_seqs; ++s) {
    const int32_t q_len = starts[s + 1] - starts[s];
    for (int32_t r = 0; r < q_len; r += row_tile) {
      const int32_t rows = std::min(row_tile, q_len - r);
      for (int32_t h = 0; h < p.kv_heads; ++h)
        tasks.push_back({s, h, starts[s] + r, rows, lens[s] - q_len + r, 0, 1, -1});
    }
  }
  return tasks;
}

// Splits each task's context so that no unit costs much more than 1 / (kUnitsPerThread x
// threads) of the call, keeping at least kMinSplitKeys keys per split; returns the items in
// units, costliest unit first (so dynamic scheduling ends with the small ones), and the
// scratch size. A unit is the items of one (sequence, query rows, context split) for every
// K/V head, in head order: the heads' rows of a K/V block lie side by side in the cache
// ([NB, BS, Hkv, D]), so a thread that runs a unit reads whole blocks, the later heads mostly
// from its L2. Items taken one by one read every other run of D values of each block, often
// the two halves of a block on two threads, which the hardware's prefetchers serve worse
// (docs/BENCHMARKS.md, "Attention units").
std::vector<Item> split_tasks(std::vector<Task>& tasks, int64_t kv_heads, int64_t group,
                              int threads, int64_t dim, int64_t* scratch_floats) {
  int64_t total = 0;
  for (const Task& t : tasks) total += t.rows * keys_of(t);
  const int64_t target = std::max<int64_t>(1, total / (int64_t(threads) * kUnitsPerThread));
  struct Unit {
    int32_t first_task, split;
    int64_t cost;
  };
  std::vector<Unit> units;
  *scratch_floats = 0;
  // make_tasks gives the K/V heads of one (sequence, query rows) as consecutive tasks, of
  // equal keys and rows, so they split alike.
  for (int32_t i = 0; i < int32_t(tasks.size()); i += int32_t(kv_heads)) {
    const int64_t keys = keys_of(tasks[i]), cost = kv_heads * tasks[i].rows * keys;
    int64_t splits = threads > 1 ? (cost + target - 1) / target : 1;
    splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(1, keys / kMinSplitKeys));
    const int64_t per = (keys + splits - 1) / splits;
    const int32_t split_keys = int32_t((per + kKeyChunk - 1) / kKeyChunk * kKeyChunk);
    const int32_t count = int32_t((keys + split_keys - 1) / split_keys);
    for (int32_t h = i; h < i + int32_t(kv_heads); ++h) {
      Task& t = tasks[h];
      t.split_keys = split_keys;
      t.splits = count;
      if (count > 1) {
        t.scratch = *scratch_floats;
        *scratch_floats += int64_t(count) * t.rows * group * (dim + 2);
      }
    }
    for (int32_t c = 0; c < count; ++c)
      units.push_back(
          {i, c, kv_heads * tasks[i].rows * std::min<int64_t>(split_keys, keys - c * split_keys)});
  }
  std::stable_sort(units.begin(), units.end(),
                   [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  std::vector<Item> items;
  items.reserve(units.size() * kv_heads);
  for (const Unit& u : units)
    for (int32_t h = 0; h < int32_t(kv_heads); ++h)
      items.push_back({u.first_task + h, u.split});
  return items;
}

// One item's running state: per query (row r, head g of the group, index r * G + g) the
// fp32 query, the softmax max m and sum l, and the unnormalised output; and room for a
// chunk's K and V rows in fp32 (Fp32Chunks).
struct State {
  std::vector<float> q, m, l, acc, k_rows, v_rows;
  void reset(int64_t queries, int64_t dim) {
    q.resize(queries * dim);
    m.assign(queries, kNegInf);
    l.assign(queries, 0.f);
    acc.assign(queries * dim, 0.f);
    k_rows.resize(kKeyChunk * dim);
    v_rows.resize(kKeyChunk * dim);
  }
};

template <typename T>
void load_queries(const Problem& p, const Task& t, const T* q, State& st) {
  for (int32_t r = 0; r < t.rows; ++r)
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t head = t.kv_head * p.group + g;
      const T* src = q + (t.row0 + r) * p.q_token_stride + head * p.q_head_stride;
      float* dst = st.q.data() + (r * p.group + g) * p.dim;
      for (int64_t d = 0; d < p.dim; ++d) dst[d] = to_float(src[d]);
    }
}

// The K and V rows of a split's keys [begin, end), a chunk of kKeyChunk at a time, through
// the block table. A running (block, offset) rather than a division per key, which would
// cost more than the key's dot product at small head_dim. Each chunk's rows are found one
// chunk ahead (next_k, next_v), so that the vector paths can ask memory for them while
// they work on the chunk before: the blocks lie anywhere in the pool, and the hardware's
// prefetcher does not find them.
template <typename T>
class ChunkWalker {
 public:
  ChunkWalker(const Problem& p, const Task& t, const T* k_cache, const T* v_cache,
              int32_t begin, int32_t end)
      : table_(p.tables + int64_t(t.seq) * p.table_width),
        block_size_(p.block_size),
        row_stride_(p.kv_heads * p.dim),
        block_(begin / p.block_size),
        offset_(begin % p.block_size),
        k_(k_cache + t.kv_head * p.dim),
        v_(v_cache + t.kv_head * p.dim),
        first_(begin),
        end_(end),
        n_(std::min(kKeyChunk, end - begin)) {
    find(n_, rows_[0][0], rows_[0][1]);
    look_ahead();
  }

  bool done() const { return first_ >= end_; }
  int32_t first() const { return first_; }  // the chunk's first key
  int n() const { return n_; }               // its keys; k() is padded to kKeyChunk rows
  const T* const* k() const { return rows_[c_][0]; }
  const T* const* v() const { return rows_[c_][1]; }
  int next_n() const { return next_n_; }  // the chunk after: 0 where this one is the last
  const T* const* next_k() const { return rows_[c_ ^ 1][0]; }
  const T* const* next_v() const { return rows_[c_ ^ 1][1]; }

  void advance() {
    first_ += kKeyChunk;
    c_ ^= 1;
    n_ = next_n_;
    look_ahead();
  }

 private:
  void look_ahead() {
    next_n_ = std::max(0, std::min(kKeyChunk, end_ - first_ - kKeyChunk));
    if (next_n_ > 0) find(next_n_, rows_[c_ ^ 1][0], rows_[c_ ^ 1][1]);
  }

  // The next n keys' rows into k[0, n) and v[0, n); k is padded to kKeyChunk with a row
  // that may be read but is never weighted (dot_keys works in eights).
  void find(int n, const T** k, const T** v) {
    for (int i = 0; i < n; ++i) {
      const int64_t row = (int64_t(table_[block_]) * block_size_ + offset_) * row_stride_;
      k[i] = k_ + row;
      v[i] = v_ + row;
      if (++offset_ == block_size_) {
        offset_ = 0;
        ++block_;
      }
    }
    for (int i = n; i < kKeyChunk; ++i) k[i] = k[0];
  }

  const int32_t* table_;
  int64_t block_size_, row_stride_, block_, offset_;
  const T* k_;
  const T* v_;
  int32_t first_, end_;
  int n_, next_n_ = 0, c_ = 0;
  const T* rows_[2][2][kKeyChunk];  // [chunk parity][k, v][key]
};

#if PALM_CPU_AVX2
// The chunks of a 16-bit cache as fp32 rows, for the tiles (and the AVX-512 row step): each
// chunk's K and V rows, widened once into the thread's State by Widen (the ISA's widen_rows)
// as the chunk comes up, serve every query of the task from L1. The next chunk's rows stay
// the cache's own, for the prefetch.
template <typename T, auto Widen>
class Fp32Chunks {
 public:
  Fp32Chunks(ChunkWalker<T>& rows, int64_t dim, State& st)
      : rows_(rows), dim_(dim), k_data_(st.k_rows.data()), v_data_(st.v_rows.data()) {
    if (!done()) widen();
  }

  bool done() const { return rows_.done(); }
  int32_t first() const { return rows_.first(); }
  int n() const { return rows_.n(); }
  const float* const* k() const { return k_; }
  const float* const* v() const { return v_; }
  int next_n() const { return rows_.next_n(); }
  const T* const* next_k() const { return rows_.next_k(); }
  const T* const* next_v() const { return rows_.next_v(); }

  void advance() {
    rows_.advance();
    if (!done()) widen();
  }

 private:
  // k() is padded as the walker pads it: with the first row, which is read, never weighted.
  void widen() {
    const int n = rows_.n();
    Widen(rows_.k(), n, dim_, k_data_);
    Widen(rows_.v(), n, dim_, v_data_);
    for (int i = 0; i < kKeyChunk; ++i) {
      k_[i] = k_data_ + (i < n ? i : 0) * dim_;
      v_[i] = v_data_ + (i < n ? i : 0) * dim_;
    }
  }

  ChunkWalker<T>& rows_;
  int64_t dim_;
  float* k_data_;
  float* v_data_;
  const float* k_[kKeyChunk];
  const float* v_[kKeyChunk];
};
#endif

#if PALM_ATTENTION_AVX512 && PALM_ATTENTION_TILE_AVX512
// A split in AVX-512 over fp32 chunks (a ChunkWalker<float> or an Fp32Chunks): as a tile
// when the task has 8 queries or more (fewer fill too few lanes to beat the per-row step),
// else row by row with the G heads of a row together. head_dim: vector_head_dim.
template <typename Chunks>
void attend_split_avx512(const Problem& p, const Task& t, Chunks& chunks, State& st) {
  if (t.rows * p.group >= kMinTileQueries &&
      attend_tile<kKeyChunk>(st.q.data(), t.rows * p.group, p.group, p.dim, t.pos0, p.scale,
                             chunks, st.m.data(), st.l.data(), st.acc.data()))
    return;
  for (; !chunks.done(); chunks.advance()) {
    const int32_t j0 = chunks.first();
    const int n = chunks.n();
    for (int32_t r = 0; r < t.rows; ++r) {
      const int visible = std::min(n, t.pos0 + r + 1 - j0);  // causal, and never past end
      if (visible <= 0) continue;
      const int64_t q0 = int64_t(r) * p.group;
      attend_chunk_row<kKeyChunk>(st.q.data() + q0 * p.dim, p.group, p.dim, p.scale,
                                  chunks.k(), chunks.v(), visible, st.m.data() + q0,
                                  st.l.data() + q0, st.acc.data() + q0 * p.dim,
                                  chunks.next_k(), chunks.next_v(),
                                  r == 0 ? chunks.next_n() : 0);
    }
  }
}
#endif

// Keys [begin, end) of one split for every query of the task, chunk by chunk; each chunk's
// rows, loaded once, serve all the task's query rows and the G query heads of its K/V head.
template <typename T>
void attend_split(const Problem& p, const Task& t, const T* k_cache, const T* v_cache,
                  int32_t begin, int32_t end, State& st) {
  ChunkWalker<T> chunks(p, t, k_cache, v_cache, begin, end);
#if PALM_ATTENTION_AVX512 && PALM_ATTENTION_TILE_AVX512
  if (vector_head_dim(p.dim) && avx512_enabled()) {
    if constexpr (std::is_same_v<T, float>) {
      attend_split_avx512(p, t, chunks, st);
    } else {
      Fp32Chunks<T, widen_rows<T>> widened(chunks, p.dim, st);
      attend_split_avx512(p, t, widened, st);
    }
    return;
  }
#endif
#if PALM_ATTENTION_TILE_AVX2
  const int64_t queries = t.rows * p.group;
  if (queries >= kMinTileQueries && tile_avx2::takes(queries, p.dim)) {
    if constexpr (std::is_same_v<T, float>) {
      attend_tile_avx2<kKeyChunk>(st.q.data(), queries, p.group, p.dim, t.pos0, p.scale, chunks,
                                  st.m.data(), st.l.data(), st.acc.data());
    } else {
      Fp32Chunks<T, tile_avx2::widen_rows<T>> widened(chunks, p.dim, st);
      attend_tile_avx2<kKeyChunk>(st.q.data(), queries, p.group, p.dim, t.pos0, p.scale, widened,
                                  st.m.data(), st.l.data(), st.acc.data());
    }
    return;
  }
#endif
#if PALM_ATTENTION_HEADS_AVX2
  const bool heads_together = vector_head_dim(p.dim);
#endif
  alignas(32) float w[kKeyChunk];
  for (; !chunks.done(); chunks.advance()) {
    const int32_t j0 = chunks.first();
    const int n = chunks.n();
    const T* const* k = chunks.k();
    const T* const* v = chunks.v();
    for (int32_t r = 0; r < t.rows; ++r) {
      const int visible = std::min(n, t.pos0 + r + 1 - j0);  // causal, and never past end
      if (visible <= 0) continue;
#if PALM_ATTENTION_HEADS_AVX2
      if (heads_together) {
        const int64_t q0 = int64_t(r) * p.group;
        attend_chunk_row_avx2<kKeyChunk>(st.q.data() + q0 * p.dim, p.group, p.dim, p.scale, k, v,
                                         visible, st.m.data() + q0, st.l.data() + q0,
                                         st.acc.data() + q0 * p.dim, chunks.next_k(),
                                         chunks.next_v(), r == 0 ? chunks.next_n() : 0);
        continue;
      }
#endif
      for (int64_t g = 0; g < p.group; ++g) {
        const int64_t qi = r * p.group + g;
        dot_keys(st.q.data() + qi * p.dim, k, visible, int(p.dim), p.scale, w);
        const float alpha = softmax_chunk(w, visible, st.m[qi], st.l[qi]);
        scale_accumulate(st.acc.data() + qi * p.dim, alpha, w, v, visible, int(p.dim));
      }
    }
  }
}

template <typename T>
void store_output(const Problem& p, const Task& t, int64_t r, int64_t g, const float* acc,
                  float l, T* out) {
  T* dst = out + ((t.row0 + r) * p.heads + t.kv_head * p.group + g) * p.dim;
  for (int64_t d = 0; d < p.dim; ++d) dst[d] = from_float<T>(acc[d] / l);
}

// Combines a task's splits (each: m, l, then acc per query) into its output rows.
template <typename T>
void merge_splits(const Problem& p, const Task& t, const float* scratch, T* out) {
  const int64_t queries = t.rows * p.group, stride = p.dim + 2;
  std::vector<float> acc(p.dim);
  for (int64_t qi = 0; qi < queries; ++qi) {
    float m = kNegInf;
    for (int32_t c = 0; c < t.splits; ++c)
      m = std::max(m, scratch[(c * queries + qi) * stride]);  // finite: split 0 sees key 0
    float l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int32_t c = 0; c < t.splits; ++c) {
      const float* part = scratch + (c * queries + qi) * stride;
      const float w = std::exp(part[0] - m);  // 0 for a split the query sees nothing of
      l += w * part[1];
      for (int64_t d = 0; d < p.dim; ++d) acc[d] += w * part[2 + d];
    }
    store_output(p, t, qi / p.group, qi % p.group, acc.data(), l, out);
  }
}

template <typename TQ, typename TC>
void run_item(const Problem& p, const Task& t, int32_t split, const TQ* q, const TC* k_cache,
              const TC* v_cache, float* scratch, std::atomic<int32_t>& done, TQ* out) {
  thread_local State st;
  const int64_t queries = t.rows * p.group;
  st.reset(queries, p.dim);
  load_queries(p, t, q, st);
  const int32_t begin = split * t.split_keys;
  const int32_t end = std::min<int32_t>(keys_of(t), begin + t.split_keys);
  attend_split(p, t, k_cache, v_cache, begin, end, st);
  if (t.splits == 1) {  // every query saw key 0, so l >= 1
    for (int64_t qi = 0; qi < queries; ++qi)
      store_output(p, t, qi / p.group, qi % p.group, st.acc.data() + qi * p.dim,
                   st.l[qi], out);
    return;
  }
  float* part = scratch + t.scratch + split * queries * (p.dim + 2);
  for (int64_t qi = 0; qi < queries; ++qi, part += p.dim + 2) {
    part[0] = st.m[qi];
    part[1] = st.l[qi];
    std::copy_n(st.acc.data() + qi * p.dim, p.dim, part + 2);
  }
  // acq_rel: the last split to finish sees every other split's partials.
  if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == t.splits)
    merge_splits(p, t, scratch + t.scratch, out);
}

// Unit u of items (split_tasks' order): its K/V heads' items one after another on this
// thread. done: the counters of the tasks' finished splits, indexed by task.
template <typename TQ, typename TC>
void run_unit(const Problem& p, const std::vector<Task>& tasks, const std::vector<Item>& items,
              int64_t unit, const TQ* q, const TC* k_cache, const TC* v_cache, float* scratch,
              std::atomic<int32_t>* done, TQ* out) {
  for (int64_t i = unit * p.kv_heads; i < (unit + 1) * p.kv_heads; ++i) {
    const Item& it = items[i];
    run_item(p, tasks[it.task], it.split, q, k_cache, v_cache, scratch, done[it.task], out);
  }
}

// q and out of TQ, the caches of TC.
template <typename TQ, typename TC>
void run(const Problem& p, const at::Tensor& q, const at::Tensor& k_cache,
         const at::Tensor& v_cache, const int32_t* starts, const int32_t* lens,
         int64_t num_seqs, const at::Tensor& out) {
  // The AVX2 tiles take at most 32 queries: fewer rows to a task where the group is large.
  int32_t row_tile = kRowTile;
#if PALM_ATTENTION_TILE_AVX2
  if (!avx512_enabled())
    row_tile = int32_t(std::clamp<int64_t>(tile_avx2::kMaxQueries / p.group, 1, kRowTile));
#endif
  std::vector<Task> tasks = make_tasks(p, starts, lens, num_seqs, row_tile);
  const int threads = at::get_num_threads();
  int64_t scratch_floats = 0;
  const std::vector<Item> items =
      split_tasks(tasks, p.kv_heads, p.group, threads, p.dim, &scratch_floats);
  std::vector<float> scratch(scratch_floats);
  std::vector<std::atomic<int32_t>> done(tasks.size());
  const TQ* qp = q.const_data_ptr<TQ>();
  const TC* kp = k_cache.const_data_ptr<TC>();
  const TC* vp = v_cache.const_data_ptr<TC>();
  TQ* op = out.mutable_data_ptr<TQ>();
  // One unit per grab, costliest first: contexts in a batch differ by 10x and more.
  parallel_claim(int64_t(items.size()) / p.kv_heads, [&](int64_t u) {
    run_unit(p, tasks, items, u, qp, kp, vp, scratch.data(), done.data(), op);
  });
}

// The batch's tables: their layout; check_sequences checks what they hold.
void check_tables(const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                  const at::Tensor& context_lens) {
  for (const at::Tensor* t : {&block_tables, &query_start_loc, &context_lens}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "block_tables, query_start_loc, context_lens must be contiguous on the CPU");
    TORCH_CHECK(t->scalar_type() == at::kInt, "block_tables, query_start_loc, context_lens: int32");
  }
  const int64_t S = context_lens.numel();
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) >= S,
              "block_tables must be [S, max_blocks]");
  TORCH_CHECK(query_start_loc.numel() == S + 1, "query_start_loc must have S + 1 entries");
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                  const at::Tensor& context_lens, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [T, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == q.scalar_type() || q.scalar_type() == at::kFloat),
              "the caches must share one dtype: q's, or under an fp32 q a 16-bit one");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "q and the caches differ in head_dim");
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0,
              "heads must be a multiple of the K/V heads");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "out must match q in shape and dtype");
  TORCH_CHECK(q.device().is_cpu() && q.stride(2) == 1,
              "q must be on the CPU with a contiguous last dimension");
  for (const at::Tensor* t : {&k_cache, &v_cache, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "the caches and out must be contiguous on the CPU");
  }
  check_tables(block_tables, query_start_loc, context_lens);
}

// The cache is read through these numbers, so a bad one would read outside it: check each.
void check_sequences(const int32_t* starts, const int32_t* lens, const int32_t* tables,
                     int64_t num_seqs, int64_t width, int64_t block_size, int64_t num_blocks,
                     int64_t num_tokens) {
  TORCH_CHECK(starts[0] == 0 && starts[num_seqs] == num_tokens,
              "query_start_loc must run from 0 to the number of q rows");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = starts[s + 1] - starts[s], len = lens[s];
    TORCH_CHECK(q_len >= 0 && q_len <= len, "sequence ", s, ": ", q_len,
                " new tokens but a context of ", len);
    TORCH_CHECK(len <= width * block_size, "sequence ", s, ": context ", len,
                " exceeds its block table");
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
      const int32_t block = tables[s * width + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "sequence ", s, ": block id ", block,
                  " outside the cache");
    }
  }
}

void paged_attention_out(const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                         const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                         double scale, const at::Tensor& out) {
  check_inputs(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out);
  const int64_t num_seqs = context_lens.numel();
  const int32_t* starts = query_start_loc.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  Problem p{q.size(1), k_cache.size(2), q.size(1) / k_cache.size(2), q.size(2),
            k_cache.size(1), block_tables.size(1), block_tables.const_data_ptr<int32_t>(),
            float(scale), q.stride(0), q.stride(1)};
  check_sequences(starts, lens, p.tables, num_seqs, p.table_width, p.block_size,
                  k_cache.size(0), q.size(0));
  // check_inputs leaves two cases: q of the cache's dtype, or an fp32 q.
  auto with_cache = [&](auto cache_zero) {
    using TC = decltype(cache_zero);
    if (q.scalar_type() == k_cache.scalar_type())
      return run<TC, TC>(p, q, k_cache, v_cache, starts, lens, num_seqs, out);
    return run<float, TC>(p, q, k_cache, v_cache, starts, lens, num_seqs, out);
  };
  switch (k_cache.scalar_type()) {
    case at::kFloat:
      return with_cache(float{});
    case at::kHalf:
      return with_cache(c10::Half{});
    case at::kBFloat16:
      return with_cache(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "paged_attention: the caches must be float32, float16 or bfloat16, "
                  "not ", k_cache.scalar_type());
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                           double scale) {
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  paged_attention_out(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                      out);
  return out;
}

}  // namespace

struct PagedAttentionWork::Plan {
  Problem p;
  at::ScalarType cache_dtype;
  std::vector<Task> tasks;
  std::vector<Item> items;
  mutable std::vector<float> scratch;
  mutable std::vector<std::atomic<int32_t>> done;  // [layer][task]
};

PagedAttentionWork::PagedAttentionWork(const at::Tensor& block_tables,
                                       const at::Tensor& query_start_loc,
                                       const at::Tensor& context_lens, int64_t num_tokens,
                                       int64_t heads, int64_t kv_heads, int64_t dim,
                                       int64_t block_size, int64_t num_blocks,
                                       at::ScalarType cache_dtype, double scale,
                                       int64_t q_token_stride, int64_t q_head_stride,
                                       int threads, int64_t layers)
    : plan_(std::make_unique<Plan>()) {
  check_tables(block_tables, query_start_loc, context_lens);
  const int64_t S = context_lens.numel();
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of the K/V heads");
  const int32_t* starts = query_start_loc.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  Plan& plan = *plan_;
  plan.p = Problem{heads, kv_heads, heads / kv_heads, dim, block_size, block_tables.size(1),
                   block_tables.const_data_ptr<int32_t>(), float(scale), q_token_stride,
                   q_head_stride};
  check_sequences(starts, lens, plan.p.tables, S, plan.p.table_width, block_size, num_blocks,
                  num_tokens);
  TORCH_CHECK(cache_dtype == at::kFloat || cache_dtype == at::kHalf ||
                  cache_dtype == at::kBFloat16,
              "paged attention: the caches must be float32, float16 or bfloat16, not ",
              cache_dtype);
  plan.cache_dtype = cache_dtype;
  int32_t row_tile = kRowTile;
#if PALM_ATTENTION_TILE_AVX2
  if (!avx512_enabled())
    row_tile = int32_t(std::clamp<int64_t>(tile_avx2::kMaxQueries / plan.p.group, 1, kRowTile));
#endif
  plan.tasks = make_tasks(plan.p, starts, lens, S, row_tile);
  int64_t scratch_floats = 0;
  plan.items =
      split_tasks(plan.tasks, kv_heads, plan.p.group, threads, dim, &scratch_floats);
  plan.scratch.resize(scratch_floats);
  plan.done =
      std::vector<std::atomic<int32_t>>(plan.tasks.size() * std::max<int64_t>(layers, 1));
}

PagedAttentionWork::~PagedAttentionWork() = default;

int64_t PagedAttentionWork::units() const {
  return int64_t(plan_->items.size()) / plan_->p.kv_heads;
}

void PagedAttentionWork::run(int64_t layer, int64_t unit, const float* q, const void* k_cache,
                             const void* v_cache, float* out) const {
  const Plan& plan = *plan_;
  auto with_cache = [&](auto cache_zero) {
    using TC = decltype(cache_zero);
    run_unit(plan.p, plan.tasks, plan.items, unit, q, static_cast<const TC*>(k_cache),
             static_cast<const TC*>(v_cache), plan.scratch.data(),
             plan.done.data() + layer * plan.tasks.size(), out);
  };
  switch (plan.cache_dtype) {
    case at::kFloat:
      return with_cache(float{});
    case at::kHalf:
      return with_cache(c10::Half{});
    default:
      return with_cache(c10::BFloat16{});
  }
}

}  // namespace palm_cpu

TORCH_LIBRARY_FRAGMENT(palm_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor context_lens, float scale) -> Tensor");
  m.def("paged_attention_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor context_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(palm_cpu, CPU, m) {
  m.impl("paged_attention", &palm_cpu::paged_attention);
  m.impl("paged_attention_out", &palm_cpu::paged_attention_out);
}
