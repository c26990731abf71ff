"""The seam between the front (HTTP, text) and the engine core (model, step loop).

Typed messages that carry token ids, never text. Each fact crosses once: a request's
prompt ids travel in its EngineCoreRequest only; an output carries only the tokens its
step produced; one step's outputs travel together with the core's figures after it."""

from __future__ import annotations

from dataclasses import dataclass

from .outputs import FinishReason, TokenLogprob
from .sampling_params import SamplingParams
from .stats import EngineStats


@dataclass(slots=True)
class EngineCoreRequest:
    """A tokenized, validated request: the front built it once (InputProcessor)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # time.monotonic() at arrival in the front (CLOCK_MONOTONIC: one clock per machine).
    arrival_time: float


@dataclass(slots=True)
class FinishRequests:
    """Front -> core: stop these requests and free their blocks. reason "abort": the
    caller left; "stop": the front saw a stop string (the core never sees text)."""

    request_ids: list[str]
    reason: FinishReason = "abort"


@dataclass(slots=True)
class EngineCoreOutput:
    """Core -> front: one request's tokens from one step."""

    request_id: str
    new_token_ids: list[int]
    # Set on the request's last output. "stop" from the core means EOS or a stop token id,
    # and that token is the last of new_token_ids, or (grammar_complete) that the
    # structured output is complete, and every token is text.
    finish_reason: FinishReason | None = None
    # The stop token id that ended the request (None for EOS and every other reason).
    stop_token_id: int | None = None
    error: str | None = None
    # When requested: one entry per new token.
    logprobs: list[TokenLogprob] | None = None
    # Once, when requested: one entry per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Prompt tokens found in the prefix cache at the first admission.
    num_cached_tokens: int = 0
    # time.monotonic() when the core first scheduled the request.
    first_scheduled_time: float | None = None
    grammar_complete: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineCoreOutputs:
    """Core -> front: everything one step produced, and the core's figures after it."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
