"""Server-sent events framing: `data: <json>\\n\\n` per event, `data: [DONE]` last (the
OpenAI convention our clients parse)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse_event(data: BaseModel | dict) -> bytes:
    if isinstance(data, BaseModel):
        payload = data.model_dump_json(exclude_none=True)
    else:
        payload = json.dumps(data, separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\n"


class TextEvents:
    """The events of a stream's text deltas, each the bytes sse_event(make(index, text))
    gives, built without pydantic per event: make's event is serialized once per index with a
    marker for the text, and each event is the part before the marker, the text as a JSON
    string, and the part after. Validating and dumping a model per token is most of the
    front's cost per streamed token. Where the marker's JSON appears other than once (an id
    that happens to hold it), every event of that index is built by make."""

    MARKER = "\x00palm-serve text\x00"

    def __init__(self, make: Callable[[int, str], BaseModel | dict]) -> None:
        self._make = make
        self._parts: dict[int, tuple[bytes, bytes] | None] = {}

    def event(self, index: int, text: str) -> bytes:
        if index not in self._parts:
            self._parts[index] = self._split(index)
        parts = self._parts[index]
        if parts is None:
            return sse_event(self._make(index, text))
        return parts[0] + json.dumps(text).encode() + parts[1]

    def _split(self, index: int) -> tuple[bytes, bytes] | None:
        event = sse_event(self._make(index, self.MARKER))
        pieces = event.split(json.dumps(self.MARKER).encode())
        return (pieces[0], pieces[1]) if len(pieces) == 2 else None


class ClientStalled(Exception):
    """The client stopped reading: a write waited longer than the stall timeout."""


class StallWatchdog:
    """Ends a write that waits longer than `timeout` seconds, raising ClientStalled in its
    task. Writes only note when they start and end: one timer serves the whole response and
    is set again only when it fires during a write (asyncio.wait_for would make a task and a
    timer for every write, that is for every streamed token)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.fired = False
        self._loop = asyncio.get_running_loop()
        self._started: float | None = None  # when the write in progress began
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def send(self, send: Send, message: Message) -> None:
        self._started, self._task = self._loop.time(), asyncio.current_task()
        if self._timer is None:
            self._timer = self._loop.call_at(self._started + self.timeout, self._check)
        try:
            await send(message)
        except asyncio.CancelledError:
            if not self.fired or self._task is None:
                raise
            if hasattr(self._task, "uncancel"):  # Python 3.11+ counts cancellations
                self._task.uncancel()
            raise ClientStalled from None
        finally:
            self._started = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._started is None or self._task is None:
            return  # between writes: the next write sets the timer again
        deadline = self._started + self.timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
            return
        self.fired = True
        self._task.cancel()


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is always closed when the response
    ends, also when the client disconnected: that is what aborts the engine request.

    A client that stops reading would otherwise hold its request, and every output the
    engine makes for it, in memory: once a write has waited stall_timeout seconds (the
    transport's buffer is full), on_stall is called and the response ends."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None] | None = None,
        *,
        stall_timeout: float = 30.0,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close, self.on_stall = on_close, on_stall
        self.stall_timeout = stall_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchdog = StallWatchdog(self.stall_timeout)

        async def bounded_send(message: Message) -> None:
            await watchdog.send(send, message)

        try:
            await super().__call__(scope, receive, bounded_send)
        except Exception:  # ClientStalled, alone or in a task group's exception group
            if not watchdog.fired:
                raise
            if self.on_stall is not None:
                self.on_stall()
        finally:
            watchdog.close()
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
