"""The HTTP/1.1 protocol the server runs: uvicorn's httptools protocol with a deadline on
request headers. uvicorn bounds idle keep-alive connections, but a client that sends part
of its headers (or nothing after connecting) would hold a connection for as long as it
liked; here it gets header_read_timeout seconds, then the connection is closed. The
body's own deadline is request_body.py's (a 408)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def with_header_deadline(header_read_timeout: float) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...)."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # a new request is starting on this connection
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(
                    header_read_timeout, self._headers_too_slow
                )

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, header_read_timeout: float, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(app, http=with_header_deadline(header_read_timeout), **options)
