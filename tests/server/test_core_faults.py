"""The engine core in its own process, with real processes and signals: a core killed
mid-stream ends every request at once with an error (streams: an error event then
[DONE]; JSON: 503), /ready turns 503, new requests get 503 with Retry-After, the front
restarts the core (palm_engine_restarts_total), and the new core serves what a fresh
server serves. A front killed with SIGKILL takes its core with it (test_drain.py checks
that SIGTERM leaves no child). --no-engine-process still serves, from a thread."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from httpx_sse import aconnect_sse

from server_helpers import (
    children,
    free_port,
    metric,
    model_dir,  # noqa: F401
    oracle,  # noqa: F401
    parse_metrics,
    process_alive,
    running_server,
)

N_STREAMS = 16
# The bound: a stream whose core died ends within this long.
STREAM_END_SECONDS = 2.0
# The restart comes after this backoff: long enough that the 503s are seen meanwhile.
BACKOFF_SECONDS = 3.0
LONG = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def restarting(model_dir):
    with running_server(model_dir, engine_restart_backoff=BACKOFF_SECONDS) as s:
        yield s


def core_pid(server) -> int:
    pid = server.engine.client.pid
    assert pid is not None and process_alive(pid)
    return pid


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def ready_status(server) -> int:
    return httpx.get(f"{server.url}/ready", timeout=10).status_code


async def stream_until_the_end(client: httpx.AsyncClient, i: int, started: asyncio.Event, n):
    """One long stream: its events, after signalling (once all have) that tokens flow."""
    events: list[dict | str] = []
    body = {"prompt": f"stream {i}", "stream": True, **LONG}
    async with aconnect_sse(client, "POST", "/v1/generate", json=body) as source:
        async for sse in source.aiter_sse():
            events.append(sse.data if sse.data == "[DONE]" else json.loads(sse.data))
            if len(events) == 1:
                n.append(i)
                if len(n) == N_STREAMS:
                    started.set()
    return events


async def kill_core_under_load(
    server, kill=None, within: float = STREAM_END_SECONDS
) -> tuple[list[list], httpx.Response, float]:
    """16 streams and one JSON request run; the core gets SIGKILL (or `kill()` runs); every
    one must end within `within` seconds of it."""
    started, running = asyncio.Event(), []
    limits = httpx.Limits(max_connections=N_STREAMS + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        streams = [
            asyncio.ensure_future(stream_until_the_end(client, i, started, running))
            for i in range(N_STREAMS)
        ]
        plain = asyncio.ensure_future(client.post("/v1/generate", json={"prompt": "plain", **LONG}))
        await asyncio.wait_for(started.wait(), 60)
        assert not plain.done()
        if kill is None:
            os.kill(core_pid(server), signal.SIGKILL)
        else:
            kill()
        killed = time.monotonic()
        done = await asyncio.wait_for(asyncio.gather(*streams, plain), timeout=within)
        ended = time.monotonic() - killed
    return done[:-1], done[-1], ended


def assert_failed_by_the_engine(streams: list[list], plain: httpx.Response) -> list[dict]:
    """Every stream of kill_core_under_load ended with a last output of finish_reason
    "error", then an engine_error event and [DONE]; the JSON request got a 503. Returns the
    error events."""
    errors = []
    for events in streams:
        assert events[-1] == "[DONE]"
        *_, last, error = events[:-1]
        assert last["finish_reason"] == "error"
        assert error["error"]["code"] == "engine_error"
        errors.append(error["error"])
    assert plain.status_code == 503, plain.text
    return errors


def test_a_killed_core_fails_its_requests_at_once_then_is_restarted(restarting):
    s = restarting
    url = f"{s.url}/v1/generate"
    first_pid = core_pid(s)
    probe = {"prompt": "after the restart", "max_tokens": 24, "temperature": 0}
    sampled = {"prompt": "seeded", "max_tokens": 24, "temperature": 0.9, "seed": 7}
    # This module's server has served nothing yet: what a fresh server answers.
    fresh = [httpx.post(url, json=b, timeout=60).json() for b in (probe, sampled)]

    streams, plain, _ = asyncio.run(kill_core_under_load(s))

    for error in assert_failed_by_the_engine(streams, plain):
        assert "SIGKILL" in error["message"]
    assert "SIGKILL" in plain.json()["error"]["message"]
    # Within the backoff: not ready, and new requests are refused with Retry-After.
    assert ready_status(s) == 503
    assert httpx.get(f"{s.url}/ready").json() == {"status": "engine restarting"}
    refused = httpx.post(url, json=probe, timeout=10)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "engine_restarting"
    assert httpx.get(f"{s.url}/health").status_code == 200  # a restart is coming

    wait_until(lambda: ready_status(s) == 200, 120, "/ready 200 after the restart")
    assert core_pid(s) != first_pid and not process_alive(first_pid)
    m = parse_metrics(httpx.get(f"{s.url}/metrics").text)
    assert metric(m, "palm_engine_restarts_total") == 1
    assert metric(m, "palm_requests_finished_total", finish_reason="error") == N_STREAMS + 1
    after = [httpx.post(url, json=b, timeout=60).json() for b in (probe, sampled)]
    for ours, theirs in zip(after, fresh, strict=True):
        assert (ours["token_ids"], ours["text"]) == (theirs["token_ids"], theirs["text"])


# ---- the front's death and exit, as `palm-serve serve` runs ------------------------------


def start_serve(model_dir, *flags: str) -> tuple[subprocess.Popen, str, int]:
    """`palm-serve serve` in a subprocess, ready; its core's pid from the start summary."""
    port = free_port()
    argv = [sys.executable, "-m", "palm_serve.server.cli", "serve", "--model", str(model_dir)]
    argv += ["--port", str(port), "--device", "cpu", "--kernel-backend", "torch"]
    argv += ["--num-kv-blocks", "256", "--log-level", "warning", "--engine-threads", "1"]
    argv += flags
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        core = None
        for line in proc.stdout:  # the summary, printed once the core is ready
            if line.strip().startswith("engine") and "core process" in line:
                core = int(line.split("core process")[1].split()[0])
                break
        assert core is not None, proc.communicate(timeout=30)[1][-2000:]
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url), 60, "the server to listen")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, url, core


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_sigkill_on_the_front_takes_the_core_with_it(model_dir):
    proc, url, core = start_serve(model_dir)
    assert core in children(proc.pid) and process_alive(core)
    proc.kill()
    proc.communicate(timeout=10)  # reaps it and closes its pipes
    wait_until(lambda: not process_alive(core), 5, "the orphaned core to exit")


@pytest.fixture
def process_logging():
    """serve() configures this process's logging (handlers on the stderr pytest captured for
    one test): put it back as it was after the test."""
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "palm_serve.access")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.filters[:]) for lg in loggers]
    yield
    for lg, handlers, level, propagate, filters in saved:
        lg.handlers, lg.level, lg.propagate, lg.filters = handlers, level, propagate, filters
    logging.captureWarnings(False)


@pytest.mark.usefixtures("process_logging")
def test_a_core_that_cannot_start_is_an_error_exit(model_dir, capsys):
    from palm_serve.server.placement import available_cpus
    from palm_serve.server.serve import serve

    given = dict(model=model_dir, device="cpu", kernel_backend="torch", kv_cache_memory="1")
    given["engine_cpus"] = ",".join(map(str, available_cpus()))  # no pinning of pytest
    assert serve(given) == 1
    assert "the engine core failed to start: ValueError: kv_cache_memory_bytes=1" in (
        capsys.readouterr().err
    )


def test_no_engine_process_serves_from_a_thread_of_the_front(model_dir, oracle):
    with running_server(model_dir, engine_process=False, engine_cpus=None) as s:
        assert s.engine.info.core_pid is None
        body = {"prompt": "thread mode", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        out = httpx.post(f"{s.url}/v1/generate", json=body, timeout=60).json()
        assert out["token_ids"] == oracle.greedy("thread mode", 8)
