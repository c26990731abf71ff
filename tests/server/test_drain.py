"""SIGTERM on a real `palm-serve serve` process: /ready turns 503, new requests get 503,
the stream in flight completes, and the process exits 0, its engine core process (and
every other child) gone with it. With a drain delay, /ready turns 503 at the signal but
new requests are admitted until the delay is over."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx

from palm_serve.server.placement import available_cpus, plan_placement

from server_helpers import children, free_port, process_alive, write_model_dir

MAX_TOKENS = 400  # ~2 s of streaming: far longer than the 503 checks made meanwhile


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


def start_server(
    tmp_path, drain_timeout: float, max_positions: int = 512, drain_delay: float = 0.0
):
    model_dir = write_model_dir(tmp_path / "tiny", max_positions=max_positions)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "palm_serve.server.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--kernel-backend",
            "torch",
            "--num-kv-blocks",
            "512",
            "--drain-timeout",
            str(drain_timeout),
            "--drain-delay",
            str(drain_delay),
            "--max-tokens-limit",
            str(max_positions - 16),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stream_through_sigterm(proc, url: str, max_tokens: int, during) -> list[dict]:
    """Stream one request; SIGTERM after its first event; `during()` runs right then."""
    body = {"prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{url}/v1/generate", json=body) as stream,
    ):
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        during()
        events = [first] + [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def test_sigterm_drains_then_exits_0_and_leaves_no_child(tmp_path):
    proc, url = start_server(tmp_path, drain_timeout=60)
    kids = children(proc.pid)  # the engine core, multiprocessing's resource tracker
    assert kids
    try:

        def refused_meanwhile() -> None:
            assert _ready_status(url) == 503
            refused = httpx.post(f"{url}/v1/generate", json={"prompt": "new"}, timeout=10)
            assert refused.status_code == 503, refused.text
            assert "shutting down" in refused.json()["error"]["message"]

        events = stream_through_sigterm(proc, url, MAX_TOKENS, refused_meanwhile)
        assert sum(1 for e in events if e.get("token_id") is not None) == MAX_TOKENS
        assert events[-1]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        wait_gone(kids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out, err = proc.communicate()
    assert f"listening on {url}" in out
    assert "KV pool  512 blocks x 16 tokens = 8192 tokens" in out and "backend  torch" in out
    assert any(f"engine   core process {pid} " in out for pid in kids)
    # A checkpoint of kilobytes: where the core shares the front's CPUs, decodes on one thread.
    shared = plan_placement(available_cpus(), environ={}).front_cpus is None
    if shared and len(available_cpus()) > 1:
        assert "; decode steps on 1)" in out
    else:
        assert "decode steps" not in out


def test_drain_timeout_aborts_what_still_runs_and_exits_0(tmp_path):
    # 4000 tokens take the tiny model far longer than the 1 s drain timeout.
    proc, url = start_server(tmp_path, drain_timeout=1, max_positions=4096)
    try:
        events = stream_through_sigterm(proc, url, 4000, lambda: None)
        assert events[-1]["finish_reason"] == "abort"
        assert events[-1]["usage"]["completion_tokens"] < 4000
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_drain_delay_withdraws_from_ready_but_admits_until_it_is_over(tmp_path):
    delay = 3.0
    proc, url = start_server(tmp_path, drain_timeout=60, max_positions=4096, drain_delay=delay)
    new = {"prompt": "late", "max_tokens": 2}
    # Far more tokens than the delay lets the tiny model produce: the drain, once it starts,
    # waits for this stream, so the server is still there to refuse.
    long = {"prompt": "drain me", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{url}/v1/generate", json=long) as stream,
        ):
            lines = stream.iter_lines()  # kept: a collected iterator closes the stream
            next(line for line in lines if line.startswith("data: "))
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert _ready_status(url) == 503
            admitted = httpx.post(f"{url}/v1/generate", json=new, timeout=10)
            assert admitted.status_code == 200, admitted.text
            admitted_after = time.monotonic() - signalled
            refused = httpx.post(f"{url}/v1/generate", json=new, timeout=10)
            while refused.status_code == 200:
                time.sleep(0.05)
                refused = httpx.post(f"{url}/v1/generate", json=new, timeout=10)
            refused_after = time.monotonic() - signalled
            assert refused.status_code == 503, refused.text
            # Leaving the block hangs up on the stream, which aborts it and ends the drain.
        assert admitted_after < delay <= refused_after
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_gone(pids: list[int], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while any(process_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"children left: {pids}"
        time.sleep(0.05)


def _ready_status(url: str, seconds: float = 10) -> int:
    """/ready right after the signal (bounded wait for the handler to have run)."""
    deadline = time.monotonic() + seconds
    status = httpx.get(f"{url}/ready", timeout=10).status_code
    while status != 503 and time.monotonic() < deadline:
        time.sleep(0.01)
        status = httpx.get(f"{url}/ready", timeout=10).status_code
    return status
