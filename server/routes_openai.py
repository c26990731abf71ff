"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions (routes_completions.py
has the body), POST /v1/chat/completions (routes_chat.py).

Unknown fields are ignored so real clients keep working. Known OpenAI fields we accept
and ignore because they change nothing here: user, store, metadata, service_tier,
parallel_tool_calls, stream_options.include_obfuscation, and tool_choice "none"/"auto"
without tools. Known fields we cannot honour are refused with a 400 rather than
silently ignored (UNSUPPORTED below): suffix, a non-empty logit_bias, best_of != n,
tools, a response_format other than text."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ModelCard, ModelList
from .routes_common import get_state
from .state import ServerState

router = APIRouter()
STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList, summary="The served model")
async def models(request: Request) -> ModelList:
    state = get_state(request)
    card = ModelCard(id=state.model_name, created=STARTED, max_model_len=state.engine.max_model_len)
    return ModelList(data=[card])


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(
            404,
            f"model: {name!r} is not served here; this server serves {state.model_name!r}",
            code="model_not_found",
            param="model",
        )


def reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
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
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request("response_format: only type 'text' is supported", "response_format")
