"""POST /v1/completions (OpenAI legacy completions): prompts as a string, strings or token
ids, `n` choices each, `echo`, legacy `logprobs` (with echo, the prompt's own logprobs too:
the first prompt token's is null; `max_tokens: 0` with echo scores the prompt without
generating, which is how held-out perplexity is computed over HTTP), streaming with
`stream_options.include_usage`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.outputs import TokenLogprob
from ..engine.sampling_params import SamplingParams, StructuredOutputSpec
from .errors import bad_request, error_body, from_engine_error
from .generation import (
    Collected,
    Started,
    admit,
    collect_many,
    failure_event,
    make_params,
    merge,
    release_all,
    start,
    stream_response,
    tokenize,
)
from .logprobs import completion_logprobs
from .protocol import CompletionRequest
from .responses import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage
from .routes_common import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    check_model,
    default_max_tokens,
    get_state,
    reject_unsupported,
    sampling_kwargs,
    usage,
)
from .sse import DONE, TextEvents, sse_event
from .state import ServerState
from .structured_output import structured_output

router = APIRouter()


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):  # one prompt: text or token ids
        return [p]
    return list(p)  # type: ignore[arg-type]


def _params(
    state: ServerState,
    body: CompletionRequest,
    choice: int,
    structured: StructuredOutputSpec | None,
) -> SamplingParams:
    max_tokens = default_max_tokens(state, body.max_tokens)
    if max_tokens == 0 and not body.echo:
        raise bad_request(
            "max_tokens: 0 is only allowed with echo (to score the prompt)", "max_tokens"
        )
    kwargs = sampling_kwargs(body, choice)
    echo_lp = body.logprobs if body.echo else None
    return make_params(
        max_tokens=max(1, max_tokens),
        logprobs=body.logprobs,
        prompt_logprobs=echo_lp,
        structured_output=structured,
        **kwargs,
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 404: ERROR_RESPONSES[400], **STREAM_RESPONSE},
    summary="OpenAI-compatible text completions",
)
async def completions(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    state = get_state(request)
    check_model(state, body.model)
    reject_unsupported(body)
    structured = await structured_output(state, body)
    prompts, started = _prompts(body), list[Started]()
    prompt_ids = [tokenize(state, prompt) for prompt in prompts]  # once each, whatever n is
    fan_out = f" ({len(prompts)} prompt(s) x n={body.n})"
    tickets = admit(state, len(prompts) * body.n, fan_out)
    try:
        for ids in prompt_ids:
            for i in range(body.n):
                params = _params(state, body, i, structured)
                started.append(start(state, ids, params, "cmpl", tickets[len(started)]))
    except BaseException:
        release_all(tickets)
        raise
    view = _View(state, body, prompts, started)
    if body.stream:
        return stream_response(state, view.events(), started, tickets)
    try:
        results = await collect_many([s.stream for s in started], request)
    finally:
        release_all(tickets)
    return view.response(results)


class _View:
    """Shapes engine results as OpenAI completions (choice k = prompt k // n)."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        prompts: list[str | list[int]],
        started: list[Started],
    ) -> None:
        self.state, self.body, self.started = state, body, started
        self.tok = state.engine.tokenizer
        self.id, self.created = started[0].response_id, int(time.time())
        self.score_only = body.max_tokens == 0
        self.prompt_texts = [
            p if isinstance(p, str) else self.tok.decode(p) for p in prompts for _ in range(body.n)
        ]
        self.text_events = TextEvents(
            lambda k, text: self.payload([CompletionChoice(index=k, text=text)])
        )

    def usage(self, completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(s.prompt_ids) for s in self.started[:: self.body.n])
        return usage(prompt_tokens, 0 if self.score_only else completion_tokens)

    def response(self, results: list[Collected]) -> CompletionResponse:
        choices = [self.choice(k, r) for k, r in enumerate(results)]
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=self.usage(sum(len(r.token_ids) for r in results)),
        )

    def choice(self, k: int, r: Collected) -> CompletionChoice:
        prompt_text = self.prompt_texts[k] if self.body.echo else ""
        text = prompt_text + ("" if self.score_only else r.text)
        lp = None
        if self.body.logprobs is not None:
            lp = self.prompt_lp(k, r.prompt_logprobs) if self.body.echo else CompletionLogprobs()
            if not self.score_only:
                _extend(lp, self.new_lp(r.token_ids, r.logprobs, len(prompt_text)))
        return CompletionChoice(
            index=k,
            text=text,
            logprobs=lp,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
        )

    def prompt_lp(self, k: int, entries: list[TokenLogprob | None] | None) -> CompletionLogprobs:
        ids = self.started[k].prompt_ids
        entries = entries if entries is not None else [None] * len(ids)
        return completion_logprobs(self.tok, ids, entries, 0, bool(self.body.logprobs))

    def new_lp(
        self, ids: list[int], entries: list[TokenLogprob] | None, offset: int
    ) -> CompletionLogprobs:
        listed: list[TokenLogprob | None] = list(entries) if entries is not None else []
        listed += [None] * (len(ids) - len(listed))
        return completion_logprobs(self.tok, ids, listed, offset, bool(self.body.logprobs))

    async def events(self) -> AsyncIterator[bytes]:
        body, generated = self.body, 0
        offsets = [len(t) if body.echo else 0 for t in self.prompt_texts]
        seen = [False] * len(self.started)
        try:
            async for k, out in merge([s.stream for s in self.started]):
                generated += len(out.new_token_ids)
                text, lp = "", None
                if body.echo and not seen[k]:
                    text = self.prompt_texts[k]
                    if body.logprobs is not None:
                        lp = self.prompt_lp(k, out.prompt_logprobs)
                seen[k] = True
                if not self.score_only:
                    text += out.new_text
                    if body.logprobs is not None:
                        new = self.new_lp(out.new_token_ids, out.logprobs, offsets[k])
                        offsets[k] += sum(len(t) for t in new.tokens)
                        lp = lp or CompletionLogprobs()
                        _extend(lp, new)
                if lp is None and not out.finished:
                    if text:  # the common event: a text delta alone
                        yield self.text_events.event(k, text)
                else:
                    choice = CompletionChoice(
                        index=k,
                        text=text,
                        logprobs=lp,
                        finish_reason=out.finish_reason if out.finished else None,
                    )
                    yield sse_event(self.payload([choice]))
                if out.finished and (failed := failure_event(out)) is not None:
                    yield failed
            if body.stream_options and body.stream_options.include_usage:
                yield sse_event(self.payload([], self.usage(generated)))
        except Exception as exc:  # headers are sent: the error travels as an event
            err = from_engine_error(exc)
            yield sse_event(error_body(err.message, err.type, err.code))
        yield DONE

    def payload(self, choices: list[CompletionChoice], usage: Usage | None = None) -> dict:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=usage,
        ).model_dump(exclude_none=False)


def _extend(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset
