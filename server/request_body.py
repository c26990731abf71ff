"""RequestBodyMiddleware: every POST body of this API is read here, before any route sees
it, and answered with a clear error when it cannot be a request: over the size limit (413),
not arriving in time (408), compressed (415), or not JSON (400, saying what is wrong and
where). A body that passes is replayed to the app labelled application/json, whatever
Content-Type the client sent (this API only speaks JSON; `curl -d` labels it a form)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import send_error
from .middleware import match_route

# Digits a JSON integer may have: every integer of this API fits in 20 (seeds < 2**63).
MAX_INT_DIGITS = 100


class BodyError(ValueError):
    """Why a body is not a request: status and 'body: what, where'."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class RequestBodyMiddleware:
    """routes: the app's; a request for none of them is left to the router (404)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, read_timeout: float, routes: list[BaseRoute]
    ) -> None:
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS")
            or match_route(self.routes, scope) is None
        ):
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            if body is None:
                return  # the client left before sending its body: nobody to answer
            check_json(body)
        except BodyError as exc:
            return await send_error(send, exc.status, exc.message, exc.code, param="body")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnects, as usual

        await self.app(as_json(scope), replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            raise BodyError(
                415,
                f"body: Content-Encoding {encoding.decode('latin-1')!r} is not accepted; "
                "send the JSON uncompressed",
                "unsupported_encoding",
            )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size, more = 0, True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyError(
                    408,
                    f"body: not received within {self.read_timeout:g} s ({size} bytes arrived)",
                    "request_timeout",
                ) from None
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                raise self._too_large()
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self) -> BodyError:
        message = f"body: request body larger than the limit of {self.max_bytes} bytes"
        return BodyError(413, message, "request_too_large")


def check_json(body: bytes) -> None:
    """BodyError unless body is one JSON document of finite numbers in valid UTF-8."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"not UTF-8 (byte 0x{body[exc.start]:02x} at byte {exc.start})") from None
    try:
        json.loads(text, parse_constant=_refuse_constant, parse_int=_int, parse_float=_float)
    except json.JSONDecodeError as exc:
        raise _invalid(f"{exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise _invalid("nested too deeply") from None
    except _BadNumber as exc:
        where = text.find(exc.text[:40])
        raise _invalid(f"{exc} at character {where}") from None


class _BadNumber(ValueError):
    def __init__(self, why: str, text: str) -> None:
        super().__init__(why)
        self.text = text


def _refuse_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a JSON number", name)


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _BadNumber(f"integer of {digits} digits (at most {MAX_INT_DIGITS})", text)
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadNumber(f"number {text[:40]} is out of range", text)
    return value


def _invalid(why: str) -> BodyError:
    return BodyError(400, f"body: invalid JSON: {why}", "invalid_json")


def as_json(scope: Scope) -> Scope:
    """The body was checked as JSON: say so to the app, whatever the client labelled it."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
