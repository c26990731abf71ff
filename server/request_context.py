"""One HTTP request's context: its id (the client's X-Request-Id, checked, or a fresh one)
and what its access-log line reports (token counts, time to first token, finish reasons),
reachable from wherever the request is served through a context variable, so that neither
the routes' signatures nor the engine have to carry it.

The access-log middleware opens the context; generation.py fills it in as the request is
served; tasks the request starts (streams, n > 1 choices) copy the context and so share
the same object."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")
REQUEST_ID_RULE = f"at most {MAX_REQUEST_ID_CHARS} characters of A-Z a-z 0-9 . _ : -"

# Engine request ids are the client's id plus '#' and a number of this process: '#' is
# never in a client's id, so two requests that send the same X-Request-Id at once (or a
# request with n > 1 choices) never share an id in the engine.
_ENGINE_ID_SEPARATOR = "#"
_engine_sequence = itertools.count()


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


@dataclass
class RequestContext:
    request_id: str
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    # One per engine request (n choices, several prompts), in the order they ended.
    finish_reasons: list[str] = field(default_factory=list)

    def on_tokens(self, count: int) -> None:
        if count and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += count

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def finish_reason(self) -> str | None:
        """The finish reason, or the distinct ones joined by ',' when choices differ."""
        return ",".join(dict.fromkeys(self.finish_reasons)) or None

    def engine_request_id(self, prefix: str) -> str:
        return f"{prefix}-{self.request_id}{_ENGINE_ID_SEPARATOR}{next(_engine_sequence)}"

    def response_id(self, prefix: str) -> str:
        """The `id` of the response body: the route's prefix and the request id."""
        return f"{prefix}-{self.request_id}"


_current: ContextVar[RequestContext | None] = ContextVar("palm_request", default=None)


def current_request() -> RequestContext | None:
    return _current.get()


def request_context() -> RequestContext:
    """The context of the request being served; outside one (code called without the
    middleware, as some unit tests do), a fresh detached context."""
    return _current.get() or RequestContext(new_request_id())


@contextmanager
def serving(context: RequestContext) -> Iterator[RequestContext]:
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
