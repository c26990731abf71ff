"""SSE framing without a server: the text events built from a template equal the events
pydantic would build, and the stall watchdog ends a write that waits too long, and only
such a write."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from palm_serve.server.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
)
from palm_serve.server.sse import ClientStalled, StallWatchdog, TextEvents, sse_event

AWKWARD_TEXTS = [
    "",
    " hello",
    'quote " backslash \\ slash /',
    "\n\r\t\b\f",
    "\x00\x01\x1f\x7f",
    "é ß 中文 😀 \U0010ffff",
    "\ud800",  # a lone surrogate: JSON can carry it escaped
    "\u2028\u2029",
    TextEvents.MARKER,
    json.dumps(TextEvents.MARKER),
    "data: [DONE]\n\n",
]


def _random_text(rng: random.Random) -> str:
    alphabet = [chr(c) for c in (*range(0, 0x80), 0xE9, 0x4E2D, 0x1F600, 0x2028, 0xFFFD)]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def _completion(response_id: str, model: str):
    def make(k: int, text: str) -> dict:
        choice = CompletionChoice(index=k, text=text)
        chunk = CompletionResponse(id=response_id, created=17, model=model, choices=[choice])
        return chunk.model_dump(exclude_none=False)

    return make


def _chat(response_id: str, model: str):
    def make(k: int, text: str) -> dict:
        choice = ChatChunkChoice(index=k, delta=ChatDelta(content=text))
        chunk = ChatCompletionChunk(id=response_id, created=17, model=model, choices=[choice])
        return chunk.model_dump(exclude_none=False)

    return make


@pytest.mark.parametrize("shape", [_completion, _chat])
@pytest.mark.parametrize(
    "response_id, model",
    [
        ("cmpl-abc", "tiny-llama"),
        ('id with "quotes" and é', "model/with\\slashes"),
        # The marker inside the id: the template cannot be split, pydantic builds the events.
        (f"x{TextEvents.MARKER}y", "m"),
        (TextEvents.MARKER, TextEvents.MARKER),
    ],
)
def test_text_events_equal_the_events_pydantic_builds(shape, response_id, model):
    make = shape(response_id, model)
    events = TextEvents(make)
    rng = random.Random(7)
    texts = AWKWARD_TEXTS + [_random_text(rng) for _ in range(200)]
    for i, text in enumerate(texts):
        k = i % 3
        assert events.event(k, text) == sse_event(make(k, text)), (k, text)


def test_each_event_parses_back_to_its_text():
    events = TextEvents(_completion("cmpl-1", "m"))
    for text in AWKWARD_TEXTS:
        payload = events.event(2, text).removeprefix(b"data: ").removesuffix(b"\n\n")
        assert b"\n\n" not in payload  # one event, however the text breaks lines
        choice = json.loads(payload)["choices"][0]
        assert (choice["index"], choice["text"]) == (2, text)


# ---- the stall watchdog --------------------------------------------------------------------


async def _sends(watchdog: StallWatchdog, delays: list[float]) -> list[float]:
    done = []

    async def send(message: dict) -> None:
        await asyncio.sleep(message["delay"])
        done.append(message["delay"])

    try:
        for delay in delays:
            await watchdog.send(send, {"delay": delay})
    finally:
        watchdog.close()
    return done


def test_a_write_that_waits_past_the_timeout_raises_client_stalled():
    async def main():
        watchdog = StallWatchdog(0.1)
        with pytest.raises(ClientStalled):
            await _sends(watchdog, [0.0, 0.01, 5.0, 0.0])
        assert watchdog.fired
        task = asyncio.current_task()
        assert task is not None
        if hasattr(task, "cancelling"):  # Python 3.11+: no cancellation left pending
            assert task.cancelling() == 0

    asyncio.run(main())


def test_slow_writes_each_within_the_timeout_never_stall_whatever_their_total():
    async def main():
        watchdog = StallWatchdog(0.3)
        delays = [0.1] * 8 + [0.0, 0.2]  # 1 s in all: the timer fires during writes, is set again
        assert await _sends(watchdog, delays) == delays
        assert not watchdog.fired

    asyncio.run(main())


def test_a_pause_between_writes_is_not_a_stall():
    async def main():
        watchdog = StallWatchdog(0.05)
        done = []

        async def send(message: dict) -> None:
            done.append(message)

        await watchdog.send(send, {"n": 1})
        await asyncio.sleep(0.2)  # the generator had nothing to write: the timer fires idle
        await watchdog.send(send, {"n": 2})
        watchdog.close()
        assert done == [{"n": 1}, {"n": 2}] and not watchdog.fired

    asyncio.run(main())


def test_a_cancellation_from_elsewhere_is_not_turned_into_a_stall():
    async def main():
        watchdog = StallWatchdog(10.0)

        async def send(message: dict) -> None:
            await asyncio.sleep(10)

        task = asyncio.ensure_future(watchdog.send(send, {}))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watchdog.close()
        assert not watchdog.fired

    asyncio.run(main())
