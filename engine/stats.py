"""EngineStats: the figures the server exports (counters cumulative since start)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    # Referenced KV blocks / total, 0..1.
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    # Prompt tokens served from the prefix cache instead of being prefilled (re-admissions
    # after a preemption included).
    prefix_cache_hit_tokens: int = 0
    # Prompt tokens of admitted requests, and tokens generated.
    prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_aborted: int = 0
    # Requests finished with an error (rejected or failed by a step).
    num_failed: int = 0
    num_finished: int = 0
    # Forward passes run (a step of several passes counts each), and the tokens they
    # computed (prefill chunks + decodes).
    num_steps: int = 0
    num_batched_tokens: int = 0
    # Speculative decoding: draft tokens verified, and those accepted.
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted / verified draft tokens (0 before any draft)."""
        return (
            self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
        )
