"""The logs of a real `palm-serve serve` process (its engine core process included), read
from its stdout and stderr:

- --log-format json at --log-level debug: every stderr line is one JSON object; one access
  line per request with its id, route, status, token counts (those of the response's
  usage), time to first token, duration, finish reason and client; a client that leaves
  a stream is a 499; and a marker string sent in prompts (successful, failing with a 4xx,
  streamed, in an unparsable body) appears nowhere in the output.
- --log-format text --log-requests: the prompt and the output are logged, on lines that
  carry the request's id, and the access line reads as text with the same fields."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from server_helpers import free_port, write_model_dir

MARKER = f"MARKER{uuid.uuid4().hex[:12]}"
HEADER = "X-Request-Id"


class LoggedServer:
    """`palm-serve serve` in a subprocess, its stdout and stderr going to files."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        model_dir = write_model_dir(tmp / "tiny")
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "palm_serve.server.cli", "serve"]
        command += ["--model", str(model_dir), "--port", str(port), "--device", "cpu"]
        command += ["--kernel-backend", "torch", "--num-kv-blocks", "256", *flags]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err)
        self._wait_ready()

    def _wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the server never became ready")

    def stop(self) -> tuple[str, str]:
        """Stops the server (drain, then exit); its whole stdout and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.out.read_text(), self.err.read_text()


def traffic(url: str) -> dict[str, httpx.Response | None]:
    """Requests whose prompts carry the marker, each with an X-Request-Id naming it."""

    def post(rid: str, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{url}{path}", headers={HEADER: rid}, timeout=60, **kwargs)

    chat = {"messages": [{"role": "user", "content": f"say {MARKER}"}], "max_tokens": 5}
    responses: dict[str, httpx.Response | None] = {
        "ok": post("ok", "/v1/generate", json={"prompt": f"a {MARKER}", "max_tokens": 4}),
        "n2": post("n2", "/v1/completions", json={"prompt": MARKER, "max_tokens": 3, "n": 2}),
        "bad-field": post("bad-field", "/v1/completions", json={"prompt": MARKER, "top_p": 7}),
        "bad-type": post("bad-type", "/v1/generate", json={"prompt": {"text": MARKER}}),
        "bad-json": post("bad-json", "/v1/generate", content=f'{{"prompt": "{MARKER}"'),
        "too-long": post("too-long", "/v1/generate", json={"prompt": MARKER * 200}),
    }
    with httpx.Client(timeout=60) as client:
        body = {**chat, "stream": True}
        with connect_sse(
            client, "POST", f"{url}/v1/chat/completions", json=body, headers={HEADER: "stream"}
        ) as source:
            responses["stream"] = source.response
            list(source.iter_sse())
        body = {"prompt": MARKER, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with connect_sse(
            client, "POST", f"{url}/v1/generate", json=body, headers={HEADER: "left"}
        ) as source:
            next(source.iter_sse())  # one event, then the client goes away
        responses["left"] = None
    return responses


@pytest.fixture(scope="module")
def json_run(tmp_path_factory) -> Iterator[tuple[dict, str, str]]:
    server = LoggedServer(tmp_path_factory.mktemp("json"), "--log-format", "json",
                          "--log-level", "debug")  # fmt: skip
    try:
        responses = traffic(server.url)
        time.sleep(0.5)  # the abandoned stream's line is written once the server notices
    finally:
        out, err = server.stop()
    yield responses, out, err


def _records(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def _access(err: str) -> dict[str, dict]:
    lines = [r for r in _records(err) if r["logger"] == "palm_serve.access"]
    by_id = {r["request_id"]: r for r in lines}
    assert len(by_id) == len(lines), "two access lines for one request"
    return by_id


def test_no_prompt_text_in_any_log_by_default(json_run) -> None:
    responses, out, err = json_run
    assert {k: r.status_code for k, r in responses.items() if r is not None} == {
        "ok": 200, "n2": 200, "bad-field": 400, "bad-type": 400, "bad-json": 400,
        "too-long": 400, "stream": 200,
    }  # fmt: skip
    assert MARKER in responses["bad-type"].text  # the client is told what it sent ...
    assert MARKER not in out and MARKER not in err  # ... the log never is


def test_every_stderr_line_is_a_json_record(json_run) -> None:
    _, _, err = json_run
    records = _records(err)  # raises on a line that is not JSON
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["logger"].startswith("palm_serve.server") for r in records)
    assert not any(r["logger"] == "uvicorn.access" for r in records)  # ours replaces it


def test_one_access_line_per_request_with_its_figures(json_run) -> None:
    responses, _, err = json_run
    access = _access(err)
    assert set(responses) <= set(access)
    for rid, r in responses.items():
        line = access[rid]
        assert line["method"] == "POST" and line["client"].startswith("127.0.0.1:")
        assert line["duration_s"] > 0
        if r is not None:
            assert line["status"] == r.status_code
    for rid in ("ok", "n2"):
        usage, line = responses[rid].json()["usage"], access[rid]
        assert line["prompt_tokens"] == usage["prompt_tokens"] > 0
        assert line["completion_tokens"] == usage["completion_tokens"] > 0
        assert 0 < line["ttft_s"] <= line["duration_s"]
    assert access["ok"]["route"] == "/v1/generate" and access["ok"]["finish_reason"] == "length"
    assert access["n2"]["finish_reason"] == "length"
    assert access["bad-field"]["finish_reason"] is None
    assert access["bad-field"]["completion_tokens"] == 0
    assert access["stream"]["route"] == "/v1/chat/completions"
    assert access["stream"]["completion_tokens"] > 0


def test_a_client_that_leaves_a_stream_is_a_499(json_run) -> None:
    _, _, err = json_run
    line = _access(err)["left"]
    assert line["status"] == 499 and line["finish_reason"] == "abort"
    assert 0 < line["completion_tokens"] < 400


def test_with_log_requests_the_text_is_logged_on_lines_with_the_id(tmp_path) -> None:
    # The engine in a thread: a faster start, and the core process's logging is the JSON
    # server's to show.
    server = LoggedServer(tmp_path, "--log-format", "text", "--log-requests", "--no-engine-process")
    try:
        r = httpx.post(
            f"{server.url}/v1/generate",
            json={"prompt": f"a {MARKER}", "max_tokens": 4},
            headers={HEADER: "logged-1"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    finally:
        _, err = server.stop()
    about = [line for line in err.splitlines() if "[logged-1]" in line]
    assert any(MARKER in line and "palm_serve.requests" in line for line in about)
    output = repr(r.json()["text"])
    assert any(output in line for line in about), "the output is logged too"
    (access,) = [line for line in about if "palm_serve.access" in line]
    assert "POST /v1/generate 200 prompt_tokens=" in access
    assert "completion_tokens=4 " in access and "finish_reason=length " in access
    assert MARKER not in "\n".join(line for line in err.splitlines() if line not in about)
