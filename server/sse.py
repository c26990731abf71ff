"""Server-sent events framing: `data: <json>\\n\\n` per event, `data: [DONE]` last (the
OpenAI convention our clients parse)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse_event(data: BaseModel | dict) -> bytes:
    if isinstance(data, BaseModel):
        payload = data.model_dump_json(exclude_none=True)
    else:
        payload = json.dumps(data, separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is always closed when the response
    ends, also when the client disconnected: that is what aborts the engine request."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
