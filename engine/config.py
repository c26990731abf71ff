"""EngineConfig: how the engine sizes its KV pool and batches; validated, never mutated."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
KV_CACHE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    # Tokens per KV-cache block.
    block_size: int = 16
    # Explicit pool size in blocks; None sizes the pool from kv_cache_memory_bytes.
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * MIB
    # The cache's dtype (a name in KV_CACHE_DTYPES); None: the model's. A 16-bit cache
    # under fp32 weights halves the pool's bytes per token and what attention reads.
    kv_cache_dtype: str | None = None
    # At most this many sequences run (hold blocks and are scheduled) at once.
    max_num_seqs: int = 64
    # Token budget of one step: decodes (1 each) plus prefill chunks.
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # Prompt + output limit per request; None means the model's max_positions.
    max_model_len: int | None = None
    # n-gram speculative decoding (engine/speculative.py): draft up to
    # num_speculative_tokens tokens from the longest suffix match (ngram_max..ngram_min
    # tokens) in the request's own tokens, verified in one forward pass.
    speculative_ngram: bool = False
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 3
    # Speculate only while at most this many sequences run: past it the step is
    # compute-bound and verifying drafts costs more than it saves (docs/BENCHMARKS.md).
    speculative_max_running: int = 16
    # torch threads for a step with no prompt work (decodes only); None: the core's own.
    # Fewer than the core's leave a CPU it shares with the front to the front while a
    # decode step (small matmuls) gains little from it (docs/BENCHMARKS.md, placement).
    decode_threads: int | None = None
    # Most forward passes per scheduling decision for a batch of plain decodes (vLLM's
    # --num-scheduler-steps): each pass's sampled tokens are the next one's inputs, and the
    # scheduler, the runner's inputs and the outputs run once for all of them. Passes stop
    # early when a request arrives or leaves, or a sequence stops (scheduler.py says which
    # batches qualify), and before a pass would end past scheduler_steps_max_ms: a model
    # whose passes are short gains most from sharing the Python, and its tokens still
    # stream that often; one whose passes are long runs one at a time.
    num_scheduler_steps: int = 8
    scheduler_steps_max_ms: float = 25.0

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, "block_size", "must be >= 1"),
            (self.num_blocks is None or self.num_blocks >= 1, "num_blocks", "must be >= 1"),
            (self.kv_cache_memory_bytes >= 1, "kv_cache_memory_bytes", "must be >= 1"),
            (
                self.kv_cache_dtype in (None, *KV_CACHE_DTYPES),
                "kv_cache_dtype",
                f"must be None or one of {', '.join(KV_CACHE_DTYPES)}",
            ),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1"),
            (
                self.max_model_len is None or self.max_model_len >= 1,
                "max_model_len",
                "must be >= 1",
            ),
            (self.num_speculative_tokens >= 1, "num_speculative_tokens", "must be >= 1"),
            (self.ngram_min >= 1, "ngram_min", "must be >= 1"),
            (self.ngram_max >= self.ngram_min, "ngram_max", "must be >= ngram_min"),
            (self.speculative_max_running >= 1, "speculative_max_running", "must be >= 1"),
            (
                self.decode_threads is None or self.decode_threads >= 1,
                "decode_threads",
                "must be >= 1",
            ),
            (self.num_scheduler_steps >= 1, "num_scheduler_steps", "must be >= 1"),
            (self.scheduler_steps_max_ms > 0, "scheduler_steps_max_ms", "must be > 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"EngineConfig.{name} {why}, got {getattr(self, name)!r}")
