"""Sequence: the core's state of one request: its token ids and progress, never text.
Only the block manager changes its block table and block hashes; only the scheduler
changes its status and computed count."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .outputs import FinishReason, TokenLogprob
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .structured_output import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # The request's own random stream: its samples do not depend on its neighbours.
    generator: torch.Generator
    # Prompt followed by the generated tokens.
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose K/V are in the cache (prefix hits included).
    num_computed_tokens: int = 0
    # Owned by the BlockManager: block ids, and hashes of the full blocks of token_ids.
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    # Prompt tokens served from the prefix cache at the first admission.
    num_cached_tokens: int = 0
    # Generated tokens already handed out in an EngineCoreOutput.
    num_emitted_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    finish_reason: FinishReason | None = None
    # The stop token id that ended the sequence (not EOS).
    stop_token_id: int | None = None
    error: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # The structured-output matcher, in step with the output tokens (None: unconstrained).
    grammar: GrammarState | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Still needs logits of prompt positions (so it must not skip cached blocks)."""
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent
