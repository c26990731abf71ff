"""POST /v1/generate: our own API. One JSON document, or with `stream: true` one SSE
event per token (token id, text delta, logprob when asked), a last event with the finish
reason and usage, then `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from .errors import bad_request, error_body, from_engine_error
from .generation import collect, make_params, start
from .logprobs import generate_logprob
from .protocol import DEFAULT_MAX_TOKENS, GenerateRequest, SamplingFields
from .responses import GenerateResponse, GenerateStreamEvent, Usage
from .routes_common import ERROR_RESPONSES, STREAM_RESPONSE, get_state
from .sse import DONE, SSEResponse, sse_event
from .state import ServerState

router = APIRouter()


def check_max_tokens(state: ServerState, max_tokens: int, name: str = "max_tokens") -> None:
    limit = state.settings.max_tokens_limit
    if max_tokens > limit:
        raise bad_request(f"{name}: {max_tokens} is over this server's limit of {limit}", name)


def default_max_tokens(state: ServerState, asked: int | None) -> int:
    if asked is not None:
        check_max_tokens(state, asked)
        return asked
    return min(DEFAULT_MAX_TOKENS, state.settings.max_tokens_limit)


def sampling_kwargs(body: SamplingFields, choice: int = 0) -> dict:
    """The SamplingParams fields every route shares, from the request body. Choice k of a
    seeded request with n > 1 draws from seed + k: the n choices differ and each stays
    reproducible."""
    seed = None if body.seed is None else (body.seed + choice) % (2**63)
    return dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop_tuple(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        seed=seed,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


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
        **sampling_kwargs(body),
    )
    run = start(state, body.prompt, params, "gen")
    if body.stream:
        return SSEResponse(_events(state, run.stream, run.request_id, params), run.ticket.release)
    try:
        result = await collect(run.stream, request)
    finally:
        run.ticket.release()
    tokenizer = state.engine.tokenizer
    return GenerateResponse(
        id=run.request_id,
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


async def _events(
    state: ServerState, stream: AsyncIterator[RequestOutput], rid: str, params: SamplingParams
) -> AsyncIterator[bytes]:
    generated, prompt_tokens = 0, 0
    try:
        async with aclosing(stream) as outs:
            async for out in outs:
                prompt_tokens = out.num_prompt_tokens or prompt_tokens
                for event in _token_events(state, out, rid, params):
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
    except Exception as exc:  # headers are sent: the error travels as an event
        err = from_engine_error(exc)
        yield sse_event(error_body(err.message, err.type, err.code))
    yield DONE


def _token_events(
    state: ServerState, out: RequestOutput, rid: str, params: SamplingParams
) -> list[GenerateStreamEvent]:
    """One event per new token; the output's text delta rides on its last token (text is
    only safe to emit at whole characters, so a token may carry "")."""
    ids, lps = out.new_token_ids, out.logprobs or []
    events = []
    for i, token_id in enumerate(ids):
        lp = generate_logprob(state.engine.tokenizer, lps[i]) if i < len(lps) else None
        text = out.new_text if i == len(ids) - 1 else ""
        events.append(GenerateStreamEvent(id=rid, token_id=token_id, text=text, logprob=lp))
    return events
