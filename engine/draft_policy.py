"""DraftPolicy: which sequences speculate this step, and how many draft tokens they get.
The one place that decides it (the scheduler asks; the proposer only finds n-grams)."""

from __future__ import annotations

from .config import EngineConfig
from .ngram_proposer import NgramProposer
from .sampler import needs_only_the_model
from .sequence import Sequence


class DraftPolicy:
    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_running = config.speculative_max_running
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.ngram_min, config.ngram_max)

    def speculates(self, seq: Sequence, num_running: int) -> bool:
        """A decoding sequence speculates unless the batch is large enough that the step is
        compute-bound (verifying drafts would then cost more than it saves), or its tokens
        need more than the model's logits row after row (needs_only_the_model)."""
        return (
            num_running <= self.max_running
            and seq.num_uncomputed_tokens == 1
            and needs_only_the_model(seq)
        )

    def draft(self, seq: Sequence, num_running: int, budget: int) -> list[int]:
        """Draft tokens for seq's next step: [] when it does not speculate. At most what the
        token budget (its own token first), max_tokens and the context length leave: the
        k drafts and the token after them must still be allowed to be generated."""
        if not self.speculates(seq, num_running):
            return []
        room = min(
            self.num_speculative_tokens,
            budget - 1,
            seq.params.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - seq.num_tokens - 1,
        )
        return self.proposer.propose(seq.token_ids, room) if room > 0 else []
