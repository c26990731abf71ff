"""OutputProcessor: the front's way out. Turns the core's token-level outputs into
RequestOutputs: text by incremental detokenization, stop strings matched across token
boundaries (the core never sees text), and the figures a response reports.

A stop string ends a request here: the output is cut after the token that completed it,
and the caller must tell the core to stop that request (ProcessedOutputs.stopped)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from .messages import EngineCoreOutput, EngineCoreRequest
from .outputs import FinishReason, RequestOutput
from .stop_checker import StopChecker


@dataclass
class RequestState:
    """What the front keeps of one unfinished request."""

    request: EngineCoreRequest
    stop_checker: StopChecker
    num_output_tokens: int = 0
    first_token_time: float | None = None


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    # Requests a stop string ended while the core still runs them: stop them there.
    stopped: list[str] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request: EngineCoreRequest) -> None:
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        checker = StopChecker(detokenizer, request.params.stop)
        self.states[request.request_id] = RequestState(request, checker)

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        processed = ProcessedOutputs()
        for core_out in core_outputs:
            state = self.states.get(core_out.request_id)
            if state is None:  # finished here already (stop string, abort): late tokens
                continue
            out = self._request_output(state, core_out)
            if out.finished and not core_out.finished:
                processed.stopped.append(out.request_id)
            processed.outputs.append(out)
        return processed

    def finish(
        self, request_id: str, reason: FinishReason, error: str | None = None
    ) -> RequestOutput | None:
        """End a request in the front (abort, a dead core): its last output, or None if it
        had already finished."""
        state = self.states.get(request_id)
        if state is None:
            return None
        core_out = EngineCoreOutput(request_id, [], finish_reason=reason, error=error)
        return self._request_output(state, core_out)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> list[RequestOutput]:
        return [
            out
            for request_id in list(self.states)
            if (out := self.finish(request_id, reason, error)) is not None
        ]

    def _request_output(self, state: RequestState, core_out: EngineCoreOutput) -> RequestOutput:
        """Detokenize the step's tokens; cut at a stop string; forget a finished request."""
        ids, logprobs = core_out.new_token_ids, core_out.logprobs
        reason = core_out.finish_reason
        stop_reason: str | int | None = _stop_token(core_out)
        checker = state.stop_checker
        # EOS and stop tokens end the request without text of their own.
        text_ids = ids[:-1] if reason == "stop" and not core_out.grammar_complete else ids
        for i, token in enumerate(text_ids):
            hit = checker.add_token(token)
            if hit is not None:
                ids, reason, stop_reason = ids[: i + 1], "stop", hit
                logprobs = logprobs[: i + 1] if logprobs is not None else None
                break
        else:
            if reason in ("stop", "length") and (hit := checker.flush()) is not None:
                reason, stop_reason = "stop", hit  # held-back text completed a stop string
        now = time.monotonic()
        if ids and state.first_token_time is None:
            state.first_token_time = now
        state.num_output_tokens += len(ids)
        finished = reason is not None
        request = state.request
        if finished:
            del self.states[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=ids,
            new_text=checker.take_text(final=finished),
            finished=finished,
            finish_reason=reason,
            error=core_out.error,
            logprobs=logprobs,
            prompt_logprobs=core_out.prompt_logprobs,
            stop_reason=stop_reason,
            prompt_token_ids=request.prompt_token_ids,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=state.num_output_tokens,
            num_cached_tokens=core_out.num_cached_tokens,
            arrival_time=request.arrival_time,
            first_scheduled_time=core_out.first_scheduled_time,
            first_token_time=state.first_token_time,
            time=now,
        )


def _stop_token(core_out: EngineCoreOutput) -> int | None:
    return core_out.stop_token_id if core_out.finish_reason == "stop" else None
