"""POST /v1/generate: our own API. One JSON document, or with `stream: true` one SSE
event per token (token id, text delta, logprob when asked), a last event with the finish
reason and usage, then `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.outputs import RequestOutput
from .errors import error_body, from_engine_error
from .generation import (
    OutputStream,
    admit,
    collect,
    failure_event,
    make_params,
    start,
    stream_response,
    tokenize,
)
from .logprobs import generate_logprob
from .protocol import GenerateRequest
from .responses import GenerateResponse, GenerateStreamEvent
from .routes_common import (
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    default_max_tokens,
    get_state,
    sampling_kwargs,
    usage,
)
from .sse import DONE, sse_event
from .state import ServerState
from .structured_output import structured_output

router = APIRouter()


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={**ERROR_RESPONSES, **STREAM_RESPONSE},
    summary="Generate text from a prompt (JSON, or SSE with stream: true)",
)
async def generate(body: GenerateRequest, request: Request) -> Response | GenerateResponse:
    state = get_state(request)
    params = make_params(
        max_tokens=default_max_tokens(state, body.max_tokens),
        logprobs=body.logprobs,
        structured_output=await structured_output(state, body),
        **sampling_kwargs(body),
    )
    prompt_ids = tokenize(state, body.prompt)
    (ticket,) = admit(state, 1)
    try:
        run = start(state, prompt_ids, params, "gen", ticket)
    except BaseException:
        ticket.release()
        raise
    if body.stream:
        return stream_response(state, _events(state, run.stream, run.response_id), [run], [ticket])
    try:
        result = await collect(run.stream, request)
    finally:
        run.ticket.release()
    tokenizer = state.engine.tokenizer
    return GenerateResponse(
        id=run.response_id,
        model=state.model_name,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
        stop_reason=result.stop_reason,
        usage=usage(len(run.prompt_ids), len(result.token_ids)),
        logprobs=[generate_logprob(tokenizer, lp) for lp in result.logprobs]
        if params.logprobs is not None
        else None,
    )


async def _events(state: ServerState, stream: OutputStream, rid: str) -> AsyncIterator[bytes]:
    generated, prompt_tokens = 0, 0
    try:
        async with aclosing(stream) as outs:
            async for out in outs:
                prompt_tokens = out.num_prompt_tokens or prompt_tokens
                for event in _token_events(state, out, rid):
                    yield sse_event(event)
                generated += len(out.new_token_ids)
                if out.finished:
                    yield sse_event(
                        GenerateStreamEvent(
                            id=rid,
                            text="" if out.new_token_ids else out.new_text,
                            finish_reason=out.finish_reason,
                            stop_reason=out.stop_reason,
                            usage=usage(prompt_tokens, generated),
                        )
                    )
                    if (failed := failure_event(out)) is not None:
                        yield failed
    except Exception as exc:  # headers are sent: the error travels as an event
        err = from_engine_error(exc)
        yield sse_event(error_body(err.message, err.type, err.code))
    yield DONE


def _token_events(state: ServerState, out: RequestOutput, rid: str) -> list[GenerateStreamEvent]:
    """One event per new token; the output's text delta rides on its last token (text is
    only safe to emit at whole characters, so a token may carry "")."""
    ids, lps = out.new_token_ids, out.logprobs or []
    events = []
    for i, token_id in enumerate(ids):
        lp = generate_logprob(state.engine.tokenizer, lps[i]) if i < len(lps) else None
        text = out.new_text if i == len(ids) - 1 else ""
        events.append(GenerateStreamEvent(id=rid, token_id=token_id, text=text, logprob=lp))
    return events
