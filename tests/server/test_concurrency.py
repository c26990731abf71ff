"""64 concurrent streaming clients each get exactly their run-alone greedy text; clients
that disconnect (streaming or not) abort their requests and the KV pool empties; the
front's merge of one response's streams (n > 1, several prompts) keeps each stream's
order, ends when all have, raises a failing stream's own error and closes every stream."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from httpx_sse import aconnect_sse

from palm_serve.server.generation import merge

from server_helpers import metric, model_dir, parse_metrics, server  # noqa: F401

N_CLIENTS = 64


def requests(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(N_CLIENTS):
        prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 40)))
        out.append(dict(prompt=f"{i}:{prompt}", max_tokens=rng.randint(1, 32), temperature=0))
    return out


async def stream_text(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, str]:
    text, reason = "", None
    async with aconnect_sse(client, "POST", url, json={**body, "stream": True}) as source:
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                break
            event = json.loads(sse.data)
            text += event["text"]
            reason = event.get("finish_reason") or reason
    return text, reason


def test_64_concurrent_streams_equal_their_run_alone_text(server):
    url = f"{server.url}/v1/generate"
    bodies = requests()
    with httpx.Client(timeout=60) as client:  # one at a time: the "alone" reference
        alone = [client.post(url, json=b).json() for b in bodies]

    async def all_at_once():
        limits = httpx.Limits(max_connections=N_CLIENTS)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream_text(client, url, b) for b in bodies))

    together = asyncio.run(all_at_once())
    for body, ref, (text, reason) in zip(bodies, alone, together, strict=True):
        assert (text, reason) == (ref["text"], ref["finish_reason"]), body
    assert wait_pool_empty(server)["kv"] == 0


def wait_pool_empty(server, seconds: float = 30) -> dict:
    """Poll /metrics (bounded) until no request runs or waits and no KV block is used."""
    deadline = time.monotonic() + seconds
    while True:
        m = parse_metrics(httpx.get(f"{server.url}/metrics").text)
        state = {
            "running": metric(m, "palm_num_requests_running"),
            "waiting": metric(m, "palm_num_requests_waiting"),
            "kv": metric(m, "palm_kv_cache_usage_ratio"),
            "aborts": metric(m, "palm_requests_finished_total", finish_reason="abort"),
        }
        if (state["running"], state["waiting"], state["kv"]) == (0, 0, 0):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool did not empty: {state}")
        time.sleep(0.1)


def test_disconnected_clients_are_aborted_and_free_their_blocks(server):
    url = f"{server.url}/v1/generate"
    before = wait_pool_empty(server)["aborts"]
    long = dict(max_tokens=480, temperature=0, ignore_eos=True)

    async def leave_mid_stream(client: httpx.AsyncClient, i: int) -> int:
        seen = 0
        async with aconnect_sse(
            client, "POST", url, json={"prompt": f"stream {i}", "stream": True, **long}
        ) as src:
            async for _ in src.aiter_sse():
                seen += 1
                if seen == 3:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def leave_while_waiting(client: httpx.AsyncClient, i: int) -> None:
        task = asyncio.ensure_future(client.post(url, json={"prompt": f"plain {i}", **long}))
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()  # closes the connection before the answer

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            seen = await asyncio.gather(*(leave_mid_stream(client, i) for i in range(6)))
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(
                *(leave_while_waiting(client, i) for i in range(2)), return_exceptions=True
            )
        return seen

    assert asyncio.run(main()) == [3] * 6
    after = wait_pool_empty(server)
    assert after["aborts"] - before == 8
    ok = httpx.post(url, json={"prompt": "still fine", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


class FakeStream:
    """An engine output stream: `count` outputs named after it, then `error` if given;
    records whether it was closed (closing an engine stream is what aborts its request)."""

    def __init__(self, name: str, count: int, error: Exception | None = None) -> None:
        self.name, self.count, self.error, self.closed = name, count, error, False

    async def outputs(self):
        try:
            for k in range(self.count):
                await asyncio.sleep(0)  # each output arrives on its own turn of the loop
                yield f"{self.name}{k}"
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


async def _merged(streams: list[FakeStream]) -> list[tuple[int, str]]:
    return [item async for item in merge([s.outputs() for s in streams])]


@pytest.mark.parametrize("counts", [[3], [2, 5], [4, 0, 1]])
def test_merge_keeps_each_streams_order_and_ends_when_all_have(counts: list[int]) -> None:
    streams = [FakeStream(chr(ord("a") + i), c) for i, c in enumerate(counts)]
    merged = asyncio.run(_merged(streams))
    for i, stream in enumerate(streams):
        assert [out for k, out in merged if k == i] == [
            f"{stream.name}{j}" for j in range(stream.count)
        ]
    assert len(merged) == sum(counts) and all(s.closed for s in streams)


@pytest.mark.parametrize("failing", [0, 1])
def test_merge_raises_a_failing_streams_own_error(failing: int) -> None:
    """The response turns the error into its error event: it must be the engine's, not a
    TypeError of the merge's own making (which would read as an internal error)."""
    streams = [FakeStream("a", 2), FakeStream("b", 1)]
    streams[failing].error = ValueError("the engine says no")
    with pytest.raises(ValueError, match="the engine says no"):
        asyncio.run(_merged(streams))


@pytest.mark.parametrize("count", [1, 3])
def test_a_consumer_that_stops_early_closes_every_stream_and_leaves_no_task(count: int) -> None:
    """A client leaving a multi-choice stream: each engine stream is closed (its request
    aborted) and no pump task is left waiting on the merge's queue for ever."""
    streams = [FakeStream(chr(ord("a") + i), 100) for i in range(count)]

    async def take_two() -> set:
        merged = merge([s.outputs() for s in streams])
        assert [await anext(merged) for _ in range(2)]
        await merged.aclose()
        for _ in range(5):  # the pumps' cancellation runs on later turns of the loop
            await asyncio.sleep(0)
        return asyncio.all_tasks() - {asyncio.current_task()}

    # Not asyncio.run, whose shutdown would wait for a pump left running: for ever.
    loop = asyncio.new_event_loop()
    try:
        left = loop.run_until_complete(take_two())
    finally:
        loop.close()
    assert all(s.closed for s in streams) and not left
