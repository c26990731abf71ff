"""What the route modules share: the state accessor, the documented error statuses, the
sampling fields every route maps the same way, and the OpenAI routes' common checks."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from .errors import APIError, bad_request
from .protocol import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, SamplingFields
from .responses import ErrorResponse, Usage
from .state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.palm


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Documented in /openapi.json on every generation route (schemathesis checks them).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Bad input: the message names the field and why"),
    401: _error("Missing or wrong API key (when the server has one)"),
    413: _error("Request body over max_request_bytes"),
    429: _error("Waiting queue full; see the Retry-After header"),
    499: _error("The client went away before the answer (never seen by that client)"),
    500: _error("An internal error (a bug): never a stack trace"),
    503: _error(
        "Draining (SIGTERM), the engine core restarting (Retry-After), stopped, or it died "
        "while running this request"
    ),
}

STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with stream: true a text/event-stream of `data: {json}` "
        "events ending with `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


# ---- sampling fields ---------------------------------------------------------------------


def check_max_tokens(state: ServerState, max_tokens: int, name: str = "max_tokens") -> None:
    limit = state.settings.max_tokens_limit
    if max_tokens > limit:
        raise bad_request(f"{name}: {max_tokens} is over this server's limit of {limit}", name)


def default_max_tokens(state: ServerState, asked: int | None) -> int:
    if asked is not None:
        check_max_tokens(state, asked)
        return asked
    return min(DEFAULT_MAX_TOKENS, state.settings.max_tokens_limit)


def sampling_kwargs(body: SamplingFields, choice: int = 0) -> dict[str, Any]:
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


# ---- the OpenAI routes' checks -----------------------------------------------------------


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(
            404,
            f"model: {name!r} is not served here; this server serves {state.model_name!r}",
            code="model_not_found",
            param="model",
        )


def reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Known OpenAI fields we cannot honour are refused rather than silently ignored:
    suffix, a non-empty logit_bias, best_of != n, tools."""
    if body.logit_bias:
        raise bad_request("logit_bias: not supported by this server", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise bad_request("suffix: not supported by this server", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of: only best_of == n is supported", "best_of")
        return
    if body.tools:
        raise bad_request("tools: tool calling is not supported by this server", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_request(
            "tool_choice: tool calling is not supported by this server", "tool_choice"
        )
