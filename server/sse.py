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


class ClientStalled(Exception):
    """The client stopped reading: a write waited longer than the stall timeout."""


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
        stalled = False

        async def bounded_send(message: Message) -> None:
            nonlocal stalled
            try:
                await asyncio.wait_for(send(message), self.stall_timeout)
            except TimeoutError:
                stalled = True
                raise ClientStalled from None

        try:
            await super().__call__(scope, receive, bounded_send)
        except Exception:  # ClientStalled, alone or in a task group's exception group
            if not stalled:
                raise
            if self.on_stall is not None:
                self.on_stall()
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
