"""DraftPolicy: which sequences speculate this step, and how many draft tokens they get.
The one place that decides it (the scheduler asks; the proposer only finds n-grams)."""

from __future__ import annotations

from .config import EngineConfig
from .ngram_proposer import NgramProposer
from .sampler import is_penalized
from .sequence import Sequence


class DraftPolicy:
    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_running = config.speculative_max_running
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.ngram_min, config.ngram_max)

    def speculates(self, seq: Sequence, num_running: int) -> bool:
        """A decoding sequence speculates unless the batch is large enough that the step is
        compute-bound (verifying drafts would then cost more than it saves), or its
        penalties depend on the tokens before each row (not computed per draft row), or it
        still owes prompt logprobs, or its output is constrained (its grammar's matcher
        advances one accepted token at a time and cannot take back a rejected draft)."""
        return (
            num_running <= self.max_running
            and seq.num_uncomputed_tokens == 1
            and not is_penalized(seq.params)
            and not seq.wants_prompt_logprobs
            and seq.params.structured_output is None
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
