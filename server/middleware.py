"""Pure ASGI middlewares (no BaseHTTPMiddleware: it would break streaming and disconnect
detection): unexpected errors, HTTP metrics, the API key. The request body's own rules
(size, read timeout, JSON) are request_body.py's."""

from __future__ import annotations

import hmac
import logging
import time
import traceback

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import send_error
from .metrics import Metrics

log = logging.getLogger("palm_serve.server")

# Routes that stay open when an API key is set: liveness, readiness, scraping, the docs.
OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json", "/redoc")


# nginx's status for a client that closed the connection before the answer.
CLIENT_CLOSED = 499


class UnhandledErrorMiddleware:
    """A request the app failed with an exception gets a 500 JSON error (traceback in the
    log only) and the connection stays usable: Starlette's own handler would re-raise to
    the server, which then drops the keep-alive connection of that client.

    An exception's message may quote the request (pydantic and JSON errors echo their
    input): unless log_messages (--log-requests), the log gets its frames and type only."""

    def __init__(self, app: ASGIApp, log_messages: bool = False) -> None:
        self.app, self.log_messages = app, log_messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the client learns only that it was our fault
            where = (scope["method"], route_template(scope, []))
            if self.log_messages:
                log.exception("unhandled error on %s %s", *where)
            else:
                log.error("unhandled error on %s %s\n%s", *where, without_messages(exc))
            if not started:
                await send_error(send, 500, "internal error", "internal_error", "server_error")


def without_messages(exc: BaseException) -> str:
    """A traceback with each exception's type and frames but not its message."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return "\nwhile handling the above, another exception:\n".join(
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_tb(e.__traceback__))
        + f"{type(e).__module__}.{type(e).__qualname__} (message not logged: --log-requests is off)"
        for e in reversed(chain)
    )


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), None

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_with_status)
            failed = False
        finally:
            if status is None:  # nothing answered: a client that left (499), or our fault
                status = 500 if failed else CLIENT_CLOSED
            labels = (scope["method"], route_template(scope, self.routes), str(status))
            self.metrics.http_requests.labels(*labels).inc()
            self.metrics.http_latency.labels(*labels).observe(time.monotonic() - start)


def route_template(scope: Scope, routes: list) -> str:
    """The path template a request was routed to (or aimed at), "unmatched" for none: never
    the raw path, which would explode label cardinality and could carry anything."""
    route = scope.get("route")  # set by the router when the app handled the request
    if route is not None and hasattr(route, "path"):
        return route.path
    return match_route(routes, scope) or "unmatched"


def match_route(routes: list, scope: Scope) -> str | None:
    """The path template of the route a request aims at, before routing (for requests
    answered by a middleware: 401, 413), or None."""
    for route in routes:
        if isinstance(route, Route) and route.matches(scope)[0] != Match.NONE:
            return route.path
        # FastAPI keeps included routers whole (our routers have no prefix).
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        nested = getattr(route, "routes", None) or getattr(inner, "routes", None)
        if nested:
            found = match_route(nested, scope)
            if found:
                return found
    return None


class APIKeyMiddleware:
    """With a key set, every route needs 'Authorization: Bearer <key>' but OPEN_PATHS and
    the paths given in open_paths or under open_prefixes (the playground's page and files:
    a browser cannot send a header when it loads a page)."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        open_paths: tuple[str, ...] = (),
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app, self.key = app, api_key.encode()
        self.open_paths, self.open_prefixes = OPEN_PATHS + open_paths, open_prefixes

    def is_open(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self.is_open(scope):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if not header or scheme.lower() != b"bearer":
            message = "missing API key: send 'Authorization: Bearer <key>'"
            return await send_error(send, 401, message, "missing_api_key", headers=_challenge())
        if not hmac.compare_digest(token.strip(), self.key):
            return await send_error(
                send, 401, "invalid API key", "invalid_api_key", headers=_challenge()
            )
        await self.app(scope, receive, send)


def _challenge() -> list[tuple[str, str]]:
    return [("www-authenticate", "Bearer")]
