"""Pure ASGI middlewares (no BaseHTTPMiddleware: it would break streaming and disconnect
detection): HTTP metrics, the request-body size limit, the API key."""

from __future__ import annotations

import hmac
import json
import time

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .metrics import Metrics

# Routes that stay open when an API key is set: liveness, readiness, scraping, the docs.
OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json", "/redoc")


async def send_error(
    send: Send, status: int, message: str, code: str, headers: list[tuple[str, str]] | None = None
) -> None:
    """An error answered before routing, in the same shape the handlers answer with."""
    body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers or []]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def route_of(self, scope: Scope) -> str:
        # The template, never the raw path: unknown paths must not explode label cardinality.
        route = scope.get("route")  # set by the router when the app handled the request
        if route is not None and hasattr(route, "path"):
            return route.path
        return _match(self.routes, scope) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            labels = (scope["method"], self.route_of(scope), str(status))
            self.metrics.http_requests.labels(*labels).inc()
            self.metrics.http_latency.labels(*labels).observe(time.monotonic() - start)


def _match(routes: list, scope: Scope) -> str | None:
    """For requests answered before routing (401, 413): find the route they aimed at."""
    for route in routes:
        if isinstance(route, Route) and route.matches(scope)[0] != Match.NONE:
            return route.path
        # FastAPI keeps included routers whole (our routers have no prefix).
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        nested = getattr(route, "routes", None) or getattr(inner, "routes", None)
        if nested:
            found = _match(nested, scope)
            if found:
                return found
    return None


class BodyLimitMiddleware:
    """413 for a body over the limit, whether announced (Content-Length) or streamed
    (chunked): the body is read here, counted, and replayed to the app (as JSON)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        scope = _as_json(scope)

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnects, as usual

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        message = f"body: request body larger than the limit of {self.max_bytes} bytes"
        await send_error(send, 413, message, "request_too_large")


def _as_json(scope: Scope) -> Scope:
    """Every body of this API is JSON: `curl -d '{...}'` labels it form-urlencoded (or a
    client sends no Content-Type); read it as JSON rather than refuse it."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    kind = dict(scope["headers"]).get(b"content-type", b"")
    if kind and not kind.startswith(b"application/x-www-form-urlencoded"):
        return scope
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


class APIKeyMiddleware:
    """With a key set, every route but OPEN_PATHS needs 'Authorization: Bearer <key>'."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if not header or scheme.lower() != b"bearer":
            message = "missing API key: send 'Authorization: Bearer <key>'"
            return await send_error(send, 401, message, "missing_api_key", _challenge())
        if not hmac.compare_digest(token.strip(), self.key):
            return await send_error(send, 401, "invalid API key", "invalid_api_key", _challenge())
        await self.app(scope, receive, send)


def _challenge() -> list[tuple[str, str]]:
    return [("www-authenticate", "Bearer")]
