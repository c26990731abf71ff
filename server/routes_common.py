"""What every route module shares: the state accessor and the documented error statuses."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from .responses import ErrorResponse
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
    500: _error("The engine failed the request"),
    503: _error("Draining (SIGTERM) or the engine has stopped"),
}

STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with stream: true a text/event-stream of `data: {json}` "
        "events ending with `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}
