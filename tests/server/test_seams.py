"""The front/core seam as a client sees it: a prompt is encoded once per request whatever
`n` is (once per prompt of a multi-prompt completion), and a client that leaves causes
exactly one abort message to the engine core."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import aconnect_sse

from palm_serve.engine.messages import FinishRequests

from server_helpers import model_dir, server  # noqa: F401  (fixtures)

GUARD = 60  # seconds: a bound on waiting, never a timed assertion


@pytest.fixture
def encodes(server) -> Iterator[list[str]]:  # noqa: F811
    """Every text the server's tokenizer encodes while the test runs."""
    tokenizer = server.engine.input_processor.tokenizer
    real = tokenizer.encode
    seen: list[str] = []

    def counting(text: str) -> list[int]:
        seen.append(text)
        return real(text)

    tokenizer.encode = counting
    try:
        yield seen
    finally:
        tokenizer.encode = real


@pytest.fixture
def finishes(server) -> Iterator[list[FinishRequests]]:  # noqa: F811
    """Every FinishRequests the front sends the core while the test runs."""
    client = server.engine.client
    real = client.finish_requests
    sent: list[FinishRequests] = []

    def recording(message: FinishRequests) -> None:
        sent.append(message)
        real(message)

    client.finish_requests = recording
    try:
        yield sent
    finally:
        client.finish_requests = real


def post(server, path: str, **body) -> dict:  # noqa: F811
    response = httpx.post(f"{server.url}{path}", json=body, timeout=GUARD)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_completion_encodes_each_prompt_once_whatever_n_is(server, encodes) -> None:  # noqa: F811
    post(server, "/v1/completions", prompt="one prompt", max_tokens=2, n=3, temperature=1.0)
    assert encodes == ["one prompt"]
    encodes.clear()
    post(server, "/v1/completions", prompt=["first", "second"], max_tokens=2, n=2)
    assert sorted(encodes) == ["first", "second"]
    encodes.clear()
    post(server, "/v1/generate", prompt="generate me", max_tokens=2)
    assert encodes == ["generate me"]


def test_a_chat_encodes_its_prompt_once_whatever_n_is(server, encodes) -> None:  # noqa: F811
    messages = [{"role": "user", "content": "hello there"}]
    body = post(server, "/v1/chat/completions", messages=messages, max_tokens=2, n=3)
    assert len(body["choices"]) == 3
    assert len(encodes) == 1 and "hello there" in encodes[0]
    encodes.clear()
    # Without max_tokens the default needs the prompt's length: still one encode.
    post(server, "/v1/chat/completions", messages=messages, n=2, stop=["e"])
    assert len(encodes) == 1


def _wait_idle(server) -> None:  # noqa: F811
    deadline = time.monotonic() + GUARD
    while server.engine.stats().kv_cache_usage or server.engine.output_processor.states:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def test_a_stream_that_disconnects_is_aborted_once(server, finishes) -> None:  # noqa: F811
    async def leave_after_two_events() -> str:
        async with httpx.AsyncClient(timeout=GUARD) as client:
            body = {"prompt": "leave", "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with aconnect_sse(client, "POST", f"{server.url}/v1/generate", json=body) as src:
                events = []
                async for event in src.aiter_sse():
                    events.append(event.json())
                    if len(events) == 2:
                        return events[0]["id"]
        raise AssertionError("the stream ended early")

    request_id = asyncio.run(leave_after_two_events())
    _wait_idle(server)
    # The engine knows it as the response's id plus '#' and a number of the front's.
    aborts = [m for m in finishes if any(r.startswith(f"{request_id}#") for r in m.request_ids)]
    assert [m.reason for m in aborts] == ["abort"]


def test_a_waiting_client_that_disconnects_is_aborted_once(server, finishes) -> None:  # noqa: F811
    async def leave_while_waiting() -> None:
        async with httpx.AsyncClient(timeout=GUARD) as client:
            body = {"prompt": "wait", "max_tokens": 400, "ignore_eos": True}
            task = asyncio.ensure_future(client.post(f"{server.url}/v1/generate", json=body))
            # Leave once the engine has the request: a fixed wait outlasted all 400 tokens
            # on a fast machine.
            deadline = time.monotonic() + GUARD
            while not server.engine.output_processor.states:
                assert time.monotonic() < deadline, "the request never reached the engine"
                await asyncio.sleep(0.005)
            assert not task.done()
            task.cancel()

    asyncio.run(leave_while_waiting())
    _wait_idle(server)
    assert [m.reason for m in finishes] == ["abort"] and len(finishes[0].request_ids) == 1
