"""POST /v1/chat/completions: messages -> one prompt through the chat template
(chat_template.py), then a completion; `n`, logprobs/top_logprobs, streaming with
`stream_options.include_usage`. Without max_tokens the answer may fill the context
(capped by the server's max_tokens_limit)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.sampling_params import SamplingParams, StructuredOutputSpec
from .chat_template import ChatTemplateError
from .errors import bad_request, error_body, from_engine_error
from .generation import (
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
from .logprobs import chat_logprobs
from .protocol import ChatCompletionRequest
from .responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    Usage,
)
from .routes_common import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    check_max_tokens,
    check_model,
    get_state,
    reject_unsupported,
    sampling_kwargs,
    usage,
)
from .sse import DONE, TextEvents, sse_event
from .state import ServerState
from .structured_output import structured_output

router = APIRouter()


def _prompt(state: ServerState, body: ChatCompletionRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return state.chat_template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None


def _max_tokens(state: ServerState, body: ChatCompletionRequest, num_prompt_tokens: int) -> int:
    max_tokens = body.max_completion_tokens or body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if max_tokens is None:  # as much as the context leaves, within the server's limit
        room = state.engine.max_model_len - num_prompt_tokens
        max_tokens = max(1, min(state.settings.max_tokens_limit, room))
    check_max_tokens(state, max_tokens, name)
    return max_tokens


def _params(
    state: ServerState,
    body: ChatCompletionRequest,
    max_tokens: int,
    choice: int,
    structured: StructuredOutputSpec | None,
) -> SamplingParams:
    kwargs = sampling_kwargs(body, choice)
    kwargs["stop"] = tuple(dict.fromkeys(state.chat_template.stop + kwargs["stop"]))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return make_params(
        max_tokens=max_tokens, logprobs=logprobs, structured_output=structured, **kwargs
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 404: ERROR_RESPONSES[400], **STREAM_RESPONSE},
    summary="OpenAI-compatible chat completions (built-in or configured chat template)",
)
async def chat(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    state = get_state(request)
    check_model(state, body.model)
    reject_unsupported(body)
    structured = await structured_output(state, body)
    # The messages' text is tokenized once, whatever n is.
    prompt_ids, started = tokenize(state, _prompt(state, body), "messages"), []
    max_tokens = _max_tokens(state, body, len(prompt_ids))
    tickets = admit(state, body.n, f" (n={body.n})")
    try:
        for i, ticket in enumerate(tickets):
            params = _params(state, body, max_tokens, i, structured)
            started.append(start(state, prompt_ids, params, "chatcmpl", ticket))
    except BaseException:
        release_all(tickets)
        raise
    view = _ChatView(state, body, started)
    if body.stream:
        return stream_response(state, view.events(), started, tickets)
    try:
        results = await collect_many([s.stream for s in started], request)
    finally:
        release_all(tickets)
    tok = state.engine.tokenizer
    choices = [
        ChatChoice(
            index=k,
            message=ChatMessageOut(content=r.text),
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            logprobs=chat_logprobs(tok, r.logprobs) if body.logprobs else None,
        )
        for k, r in enumerate(results)
    ]
    return ChatCompletionResponse(
        id=view.id,
        created=view.created,
        model=state.model_name,
        choices=choices,
        usage=view.usage(sum(len(r.token_ids) for r in results)),
    )


class _ChatView:
    def __init__(
        self, state: ServerState, body: ChatCompletionRequest, started: list[Started]
    ) -> None:
        self.state, self.body, self.started = state, body, started
        self.id, self.created = started[0].response_id, int(time.time())
        self.content_events = TextEvents(
            lambda k, text: self.payload([ChatChunkChoice(index=k, delta=ChatDelta(content=text))])
        )

    def usage(self, completion_tokens: int) -> Usage:
        return usage(len(self.started[0].prompt_ids), completion_tokens)

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return sse_event(self.payload(choices, usage))

    def payload(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=usage,
        ).model_dump(exclude_none=False)

    async def events(self) -> AsyncIterator[bytes]:
        body, generated, tok = self.body, 0, self.state.engine.tokenizer
        try:
            for k in range(len(self.started)):  # the role comes first, as OpenAI sends it
                delta = ChatDelta(role="assistant", content="")
                yield self.chunk([ChatChunkChoice(index=k, delta=delta)])
            async for k, out in merge([s.stream for s in self.started]):
                generated += len(out.new_token_ids)
                lp = chat_logprobs(tok, out.logprobs or []) if body.logprobs else None
                if lp is None and (out.new_text or out.new_token_ids):
                    yield self.content_events.event(k, out.new_text)
                elif out.new_text or out.new_token_ids:
                    delta = ChatDelta(content=out.new_text)
                    yield self.chunk([ChatChunkChoice(index=k, delta=delta, logprobs=lp)])
                if out.finished:
                    done = ChatChunkChoice(
                        index=k, delta=ChatDelta(), finish_reason=out.finish_reason
                    )
                    yield self.chunk([done])
                    if (failed := failure_event(out)) is not None:
                        yield failed
            if body.stream_options and body.stream_options.include_usage:
                yield self.chunk([], self.usage(generated))
        except Exception as exc:  # headers are sent: the error travels as an event
            err = from_engine_error(exc)
            yield sse_event(error_body(err.message, err.type, err.code))
        yield DONE
