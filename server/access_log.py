"""AccessLogMiddleware: every HTTP request gets an id and one access-log line.

The id is the client's X-Request-Id when it is valid (a 400 naming the header when it is
not), else a fresh one; it is sent back in the X-Request-Id response header, errors
included, and every log line written while the request is served carries it
(logging_config.RequestIdFilter). The line is written when the response is over: for a
stream, when the stream ends; a client that went away before the end is logged as 499,
nginx's status for it. Token counts, time to first token and finish reason are what
generation.py put in the request's context; no prompt or output text is in the line."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import send_error
from .middleware import CLIENT_CLOSED, route_template
from .request_context import (
    REQUEST_ID_HEADER,
    REQUEST_ID_RULE,
    RequestContext,
    new_request_id,
    serving,
    valid_request_id,
)

access_log = logging.getLogger("palm_serve.access")

_HEADER_KEY = REQUEST_ID_HEADER.lower().encode()


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, routes: list) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(_HEADER_KEY)
        client_id = given.decode("latin-1") if given is not None else None
        valid = client_id is not None and valid_request_id(client_id)
        context = RequestContext(client_id if valid and client_id else new_request_id())
        exchange = _Exchange(context, send)
        with serving(context):
            try:
                if client_id is not None and not valid:
                    await _refuse_request_id(exchange.send)
                else:
                    await self.app(scope, exchange.receive(receive), exchange.send)
            except BaseException:
                exchange.status = exchange.status or 500
                raise
            finally:
                write_access_line(context, scope, route_template(scope, self.routes), exchange)


class _Exchange:
    """What the middleware sees of one request: the status sent, whether the whole body was
    sent, and whether the client went away before that."""

    def __init__(self, context: RequestContext, send: Send) -> None:
        self._header = (_HEADER_KEY, context.request_id.encode())
        self._send = send
        self.status: int | None = None
        self.complete = False
        self.client_left = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", []), self._header]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        try:
            await self._send(message)
        except OSError:  # a server on ASGI spec 2.4 says a client left this way
            self.client_left = True
            raise

    def receive(self, receive: Receive) -> Receive:
        async def watching() -> Message:
            message = await receive()
            # After the response, the server answers every receive() with a disconnect.
            if message["type"] == "http.disconnect" and not self.complete:
                self.client_left = True
            return message

        return watching

    @property
    def final_status(self) -> int:
        if self.client_left or self.status is None:
            return CLIENT_CLOSED
        return self.status


async def _refuse_request_id(send: Send) -> None:
    message = f"{REQUEST_ID_HEADER}: must be {REQUEST_ID_RULE}"
    await send_error(send, 400, message, "invalid_request_id", param=REQUEST_ID_HEADER)


def write_access_line(
    context: RequestContext, scope: Scope, route: str, exchange: _Exchange
) -> None:
    status = exchange.final_status
    client = scope.get("client")
    fields = {
        "method": scope["method"],
        "route": route,
        "status": status,
        "prompt_tokens": context.prompt_tokens,
        "completion_tokens": context.completion_tokens,
        "ttft_s": _rounded(context.ttft),
        "duration_s": _rounded(time.monotonic() - context.started),
        "finish_reason": context.finish_reason,
        "client": f"{client[0]}:{client[1]}" if client else None,
    }
    access_log.info("%s %s %d", scope["method"], route, status, extra=fields)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)
