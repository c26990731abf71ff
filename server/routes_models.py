"""GET /v1/models (OpenAI-compatible): the one served model.

The OpenAI routes (routes_completions.py, routes_chat.py) ignore unknown fields so real
clients keep working; the known OpenAI fields accepted and ignored because they change
nothing here are: user, store, metadata, service_tier, parallel_tool_calls,
stream_options.include_obfuscation, and tool_choice "none"/"auto" without tools."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from .responses import ModelCard, ModelList
from .routes_common import get_state

router = APIRouter()
STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList, summary="The served model")
async def models(request: Request) -> ModelList:
    state = get_state(request)
    card = ModelCard(id=state.model_name, created=STARTED, max_model_len=state.engine.max_model_len)
    return ModelList(data=[card])
