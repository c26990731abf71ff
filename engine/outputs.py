"""What the engine hands back to its caller: one RequestOutput per step per request, built
in the front from the core's token-level outputs (output_processor.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    # The top-N alternatives (token id, logprob), most likely first; empty when N = 0.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """The increment since the previous output of the same request."""

    request_id: str
    new_token_ids: list[int]
    # Text safe to emit: never half a UTF-8 character, never part of a stop string.
    new_text: str
    finished: bool = False
    # "stop": EOS, a stop token or a stop string; "length": max_tokens or the context end;
    # "abort": aborted by the caller; "error": the engine failed the request (see error).
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Only when requested: one entry per new token.
    logprobs: list[TokenLogprob] | None = None
    # Only in the first output, when requested: one entry per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # The stop string or stop token id that ended the request, if any.
    stop_reason: str | int | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Prompt tokens served from the prefix cache instead of being prefilled.
    num_cached_tokens: int = 0
    # time.monotonic() stamps: arrival, first scheduled, first token, this output.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time: float = 0.0
