"""Errors as the API shows them: `{"error": {"message", "type", "code"}}` with the right
status, never a stack trace. Routes raise APIError; handlers here turn validation and
engine errors into the same shape (unexpected exceptions: middleware.UnhandledErrorMiddleware)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from ..engine.errors import EngineDeadError, InvalidRequestError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, code="invalid_parameter", param=param)


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="unavailable")


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


async def send_error(
    send: Send,
    status: int,
    message: str,
    code: str,
    type: str = "invalid_request_error",
    headers: list[tuple[str, str]] | None = None,
    param: str | None = None,
) -> None:
    """An error answered by a raw ASGI middleware, in the shape the handlers answer with."""
    body = json.dumps(error_body(message, type, code, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers or []]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def error_response(exc: APIError) -> JSONResponse:
    body = error_body(exc.message, exc.type, exc.code, exc.param)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def from_engine_error(exc: Exception) -> APIError:
    """Engine exceptions -> API errors (InvalidRequestError 400, EngineDeadError 503)."""
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, EngineDeadError):
        return unavailable(f"the engine has stopped: {exc}")
    return APIError(500, "internal error", type="server_error", code="internal_error")


def _param_name(loc: tuple[Any, ...]) -> str:
    # ("body", "messages", 0, "content") -> "messages[0].content"; "body" alone is the body.
    parts = [p for p in loc if p != "body"]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str]:
    """The first invalid param as 'param: why' (and the param), e.g. 'top_p: Input should be
    less than or equal to 1'. A union param fails once per member: say which types it takes."""
    errors = exc.errors() or [{"loc": ("body",), "msg": "invalid request"}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"body: invalid JSON ({first.get('ctx', {}).get('error', 'parse error')})", "body"
    loc = tuple(first.get("loc", ()))
    param_loc = _strip(loc)
    param = _param_name(param_loc)
    if param_loc == loc:
        return f"{param}: {first.get('msg', 'invalid value')}", param
    # One error per union member. A member whose type matched but whose value broke a
    # constraint ('' too short, -1 < 0) says the most; else list the accepted types.
    same = [e for e in errors if _strip(e["loc"])[: len(param_loc)] == param_loc]
    fitting = [e for e in same if not e["type"].endswith("_type")]
    if fitting:
        return f"{_param_name(_strip(fitting[0]['loc']))}: {fitting[0]['msg']}", param
    kinds = sorted({_tag_name(p) for e in same for p in e["loc"] if _is_type_tag(p)})
    return (
        f"{param}: invalid value {_short(first.get('input'))}; expected {' or '.join(kinds)}",
        param,
    )


def _strip(loc: Any) -> tuple[Any, ...]:
    return tuple(p for p in loc if not _is_type_tag(p))


def _is_type_tag(part: Any) -> bool:
    # pydantic names the member of a union it tried: 'str', 'list[int]', 'constrained-str'.
    return isinstance(part, str) and (
        "[" in part or "-" in part or part in {"str", "int", "float", "bool", "dict"}
    )


def _tag_name(tag: str) -> str:
    if tag.startswith("list[list["):
        return "a list of token-id lists"
    if tag.startswith("list["):
        return (
            "a list of token ids"
            if "int" in tag
            else "a list of " + ("strings" if "str" in tag else "objects")
        )
    return {"str": "a string", "constrained-str": "a string", "int": "an integer"}.get(tag, tag)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError(400, message, code="invalid_parameter", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(InvalidRequestError)
    @app.exception_handler(EngineDeadError)
    async def _engine(request: Request, exc: Exception) -> JSONResponse:
        return error_response(from_engine_error(exc))
