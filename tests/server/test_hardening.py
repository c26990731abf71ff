"""Hostile clients: each test is the regression test of one fault a black-box probe found
(issue 15), and fails on the code before its fix. A bad request gets a clear 4xx naming
the field, never a 500 or a reset connection, and never harms the next request."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time

import httpx
import pytest
from raw_http import RawConnection
from starlette.routing import Route

from palm_serve.server.request_body import RequestBodyMiddleware

from server_helpers import metric, model_dir, parse_metrics, running_server, server  # noqa: F401

GUARD = 60  # seconds: bounds on waiting, never timed assertions
VALID = json.dumps({"prompt": "ok", "max_tokens": 2}).encode()
JSON = {"content-type": "application/json"}


def _error(answer) -> dict:
    body = json.loads(answer.body)
    assert set(body["error"]) == {"message", "type", "code", "param"}, body
    return body["error"]


def _metrics(server) -> dict:  # noqa: F811
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=GUARD).text)


def _wait_idle(server) -> None:  # noqa: F811
    deadline = time.monotonic() + GUARD
    while server.engine.stats().kv_cache_usage or server.engine.output_processor.states:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


# ---- 1. a lone surrogate in a chat message -------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi\ud800"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi\udfff there"}]}],
        [{"role": "system", "content": "\ud83d"}, {"role": "user", "content": "hi"}],
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_is_a_400_and_the_connection_survives(server, messages, stream):  # noqa: F811
    raw = RawConnection(server.url)
    try:
        body = json.dumps({"messages": messages, "max_tokens": 2, "stream": stream}).encode()
        answer = raw.request("POST", "/v1/chat/completions", body, JSON)
        assert answer.status == 400, answer.body
        error = _error(answer)
        assert error["param"] == "messages" and "surrogate" in error["message"]
        assert raw.request("POST", "/v1/generate", VALID, JSON).status == 200
    finally:
        raw.close()


def test_an_unexpected_error_is_a_500_and_the_connection_survives(server, monkeypatch):  # noqa: F811
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(type(server.state.chat_template), "render", broken)
    raw = RawConnection(server.url)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        answer = raw.request("POST", "/v1/chat/completions", body, JSON)
        assert answer.status == 500 and _error(answer)["message"] == "internal error"
        assert b"a bug" not in answer.body  # never a stack trace in a response
        assert raw.request("POST", "/v1/generate", VALID, JSON).status == 200
    finally:
        raw.close()


# ---- 2. tiny temperatures and penalties ----------------------------------------------------


def _generate(server, **body) -> dict:  # noqa: F811
    response = httpx.post(f"{server.url}/v1/generate", json=body, timeout=GUARD)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("temperature", [1e-38, 2e-38, 1e-6])
def test_a_tiny_temperature_is_greedy(server, temperature):  # noqa: F811
    body = dict(prompt="And the king said", max_tokens=12, ignore_eos=True, seed=3)
    greedy = _generate(server, temperature=0, **body)["token_ids"]
    assert _generate(server, temperature=temperature, **body)["token_ids"] == greedy


def test_a_tiny_repetition_penalty_samples_only_seen_tokens(server):  # noqa: F811
    """A penalty below 1 boosts tokens already seen; 1e-300 boosts them past the float
    range, and they must then be all that can be drawn (not NaN probabilities)."""
    prompt = "abcabc"
    out = _generate(
        server, prompt=prompt, max_tokens=8, ignore_eos=True, seed=1, repetition_penalty=1e-300
    )
    seen = set(prompt.encode())
    for token in out["token_ids"]:
        assert token in seen, (token, seen)
        seen.add(token)


# ---- 3, 4. admission: what can never fit, and free run slots -------------------------------


def test_a_fan_out_that_can_never_fit_is_a_400_not_a_429(model_dir):  # noqa: F811
    with running_server(model_dir, max_num_seqs=2, max_queue=3) as s:
        r = httpx.post(
            f"{s.url}/v1/completions",
            json={"prompt": ["a", "b"], "n": 3, "max_tokens": 2},
            timeout=GUARD,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "n" and "6 sequences" in error["message"]
        assert "5" in error["message"]  # what the server holds: 2 running + 3 waiting
        r = httpx.post(
            f"{s.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "n": 5, "max_tokens": 2},
            timeout=GUARD,
        )
        assert r.status_code == 200 and len(r.json()["choices"]) == 5


def test_requests_within_run_slots_and_queue_are_never_429(model_dir):  # noqa: F811
    with running_server(model_dir, max_num_seqs=4, max_queue=8) as s:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=GUARD) as client:
                body = {"prompt": "burst", "max_tokens": 8, "ignore_eos": True}
                url = f"{s.url}/v1/generate"
                responses = await asyncio.gather(*(client.post(url, json=body) for _ in range(12)))
            return [r.status_code for r in responses]

        for _ in range(3):
            assert asyncio.run(burst()) == [200] * 12


# ---- 5. any Content-Type ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/octet-stream",
        "application/xml",
        "multipart/form-data; boundary=x",
    ],
)
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):  # noqa: F811
    r = httpx.post(
        f"{server.url}/v1/generate",
        content=VALID,
        headers={"content-type": content_type},
        timeout=GUARD,
    )
    assert r.status_code == 200, r.text


# ---- 6. a client that leaves mid-body ------------------------------------------------------


def test_a_client_that_leaves_mid_body_is_not_a_server_error(server):  # noqa: F811
    def count(m: dict, status: str) -> float:
        return metric(m, "palm_http_requests_total", method="POST", route="/v1/generate",
                      status=status)  # fmt: skip

    before = _metrics(server)
    for _ in range(3):
        raw = RawConnection(server.url)
        raw.send_raw(
            b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"prompt":'
        )
        raw.close()
    deadline = time.monotonic() + GUARD
    while count(_metrics(server), "499") - count(before, "499") < 3:
        assert time.monotonic() < deadline, "the drops were not counted"
        time.sleep(0.05)
    assert count(_metrics(server), "500") == count(before, "500")


# ---- 7. no redirect built from the Host header ---------------------------------------------


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(server):  # noqa: F811
    raw = RawConnection(server.url)
    try:
        answer = raw.request("POST", "/v1/generate/", VALID, {**JSON, "host": "evil.example"})
        assert answer.status == 404 and "location" not in answer.headers
    finally:
        raw.close()


# ---- 8. stalled headers and bodies ---------------------------------------------------------


@pytest.fixture(scope="module")
def impatient(model_dir):  # noqa: F811
    with running_server(
        model_dir, header_read_timeout=1.0, body_read_timeout=1.0, stream_stall_timeout=1.0
    ) as s:
        yield s


def test_unfinished_headers_are_cut_off(impatient):
    raw = RawConnection(impatient.url, timeout=15)
    try:
        raw.send_raw(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\n")  # never the blank line
        assert raw.closed_by_server()
    finally:
        raw.close()
    silent = RawConnection(impatient.url, timeout=15)  # connects, says nothing
    try:
        assert silent.closed_by_server()
    finally:
        silent.close()


def test_an_unfinished_body_is_a_408(impatient):
    raw = RawConnection(impatient.url, timeout=15)
    try:
        raw.send_raw(
            b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"prompt":'
        )
        answer = raw.read_answer()
        assert answer.status == 408 and "1 s" in _error(answer)["message"]
    finally:
        raw.close()


# ---- 9. a client that stops reading --------------------------------------------------------


def _finished(m: dict, reason: str) -> float:
    return metric(m, "palm_requests_finished_total", finish_reason=reason)


def _stall_a_completion(served, body: dict, requests: int) -> None:
    """POST a streamed completion from a client whose receive buffer fills at once and who
    never reads it, then wait until its `requests` requests are given up as stalled and
    every block is back."""
    before = _finished(_metrics(served), "stalled")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = served.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    try:
        payload = json.dumps({**body, "stream": True}).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        deadline = time.monotonic() + GUARD
        while _finished(_metrics(served), "stalled") - before < requests:
            assert time.monotonic() < deadline, "the stalled stream was never given up"
            time.sleep(0.1)
        _wait_idle(served)
    finally:
        sock.close()


def test_a_stream_nobody_reads_is_aborted_and_its_blocks_freed(impatient):
    # 48 choices of 400 tokens with 20 logprobs: ~6 MB of events even when a step's several
    # forward passes merge a choice's tokens into one event, more than the socket buffers
    # hold (16 choices came to 2 MB so merged, which the kernel's send buffer can take).
    body = {"prompt": ["x", "y", "z"], "max_tokens": 400, "ignore_eos": True, "n": 16,
            "logprobs": 20}  # fmt: skip
    _stall_a_completion(impatient, body, 48)


def test_requests_the_engine_finished_but_nobody_read_count_as_stalled(impatient):
    """4 prompts of 400 tokens scored 16 times each (echo, 20 logprobs, one token): each
    request ends in its prefill step, but their 8 MB of events are twice what the socket
    buffers hold, so the client never reads most of them. All 64 count as stalled, none as
    finished by length, however far the engine got before the response was given up."""
    before = _metrics(impatient)
    prompts = [[5 + (i * k) % 50 for i in range(400)] for k in range(1, 5)]
    body = {"prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 20, "n": 16}
    _stall_a_completion(impatient, body, 64)
    after = _metrics(impatient)
    assert _finished(after, "stalled") - _finished(before, "stalled") == 64
    assert _finished(after, "length") == _finished(before, "length")


# ---- 10. parse errors that say what and where ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b'\xff{"prompt": "x"}', {}, 400, "UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, {}, 400, "body: invalid JSON: nested too deeply"),
        (b'{"prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}", {}, 400, "5000 digits"),
        (gzip.compress(VALID, mtime=0), {"content-encoding": "gzip"}, 415, "gzip"),
        (b'{"prompt": "x", "temperature": NaN}', {}, 400, "NaN"),
        (b'{"prompt": "x", "temperature": 1e999}', {}, 400, "out of range"),
        # A long number is quoted to its first 40 characters, and found where it starts.
        (
            b'{"prompt": "x", "temperature": ' + b"9" * 400 + b".5}",
            {},
            400,
            "number " + "9" * 40 + " is out of range at character 31",
        ),
        (b'{"prompt": "x",, }', {}, 400, "line 1, column 16"),
    ],
)
def test_a_body_that_is_not_json_is_a_400_saying_what_and_where(
    server,  # noqa: F811
    body,
    headers,
    status,
    says,
):
    raw = RawConnection(server.url)
    try:
        answer = raw.request("POST", "/v1/generate", body, {**JSON, **headers})
        assert answer.status == status, answer.body
        error = _error(answer)
        assert says in error["message"] and error["param"] == "body", error
        assert status != 400 or error["code"] == "invalid_json", error
        assert raw.request("POST", "/v1/generate", VALID, JSON).status == 200
    finally:
        raw.close()


# ---- 11. the body reader alone, as an ASGI middleware (no server) ----------------------------

LIMIT = 64  # the reader's --max-request-bytes in these tests
ROUTES = [Route("/v1/generate", lambda request: None, methods=["POST"])]


class BodyReaderRun:
    """RequestBodyMiddleware over an app that records what reaches it, fed `messages` by a
    client that then goes silent; `sent` is what the middleware itself answered."""

    def __init__(
        self, messages: list[dict], headers: dict[str, str] | None = None, gap: float = 0.0
    ) -> None:
        self.messages, self.headers, self.gap = list(messages), headers or {}, gap
        self.app_scope: dict | None = None
        self.app_received: list[dict] = []
        self.sent: list[dict] = []
        self.receives = 0

    async def _receive(self) -> dict:
        self.receives += 1
        if self.messages:
            await asyncio.sleep(self.gap)
            return self.messages.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def _app(self, scope, receive, send) -> None:
        self.app_scope = scope
        self.app_received.append(await receive())
        if self.messages:  # the client's own messages come through after the replay
            self.app_received.append(await receive())

    async def _send(self, message: dict) -> None:
        self.sent.append(message)

    def run(self, method: str = "POST", path: str = "/v1/generate", timeout: float = 5.0):
        reader = RequestBodyMiddleware(self._app, LIMIT, timeout, ROUTES)
        headers = [(k.encode(), v.encode()) for k, v in self.headers.items()]
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        asyncio.run(asyncio.wait_for(reader(scope, self._receive, self._send), GUARD))
        return self

    def error(self) -> tuple[int, dict]:
        assert self.app_scope is None and len(self.sent) == 2, self.sent
        body = json.loads(self.sent[1]["body"])
        assert body["error"]["param"] == "body", body
        return self.sent[0]["status"], body["error"]


def chunk(body: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_the_body_reaches_the_app_whole_once_and_labelled_json() -> None:
    parts = [b'{"prompt": ', b'"x"', b"}"]
    later = {"type": "http.disconnect"}
    run = BodyReaderRun(
        [chunk(parts[0], True), chunk(parts[1], True), chunk(parts[2]), later],
        {"content-type": "text/plain", "x-request-id": "r1"},
    ).run()
    assert run.sent == [] and run.app_scope is not None
    assert run.app_received == [chunk(b"".join(parts)), later]
    assert run.app_scope["headers"] == [
        (b"x-request-id", b"r1"),
        (b"content-type", b"application/json"),
    ]


def test_a_body_of_exactly_the_limit_passes_and_one_byte_more_in_any_chunking_is_413() -> None:
    exact = b'{"p": "' + b"a" * (LIMIT - 9) + b'"}'
    assert len(exact) == LIMIT
    assert BodyReaderRun([chunk(exact[:10], True), chunk(exact[10:])]).run().app_received
    over = exact[:-2] + b'a"}'
    for pieces in ([over], [over[:LIMIT], over[LIMIT:]], [over[:1], over[1:]]):
        run = BodyReaderRun([chunk(p, True) for p in pieces[:-1]] + [chunk(pieces[-1])]).run()
        status, error = run.error()
        assert (status, error["code"]) == (413, "request_too_large")
        assert error["message"] == f"body: request body larger than the limit of {LIMIT} bytes"


def test_a_declared_length_over_the_limit_is_413_before_any_byte_is_read() -> None:
    run = BodyReaderRun([chunk(b"{}")], {"content-length": str(LIMIT + 1)}).run()
    assert run.error()[0] == 413 and run.receives == 0
    # A length that is not a number, or within the limit, is left to the bytes that arrive.
    for declared in ("abc", "-5", str(LIMIT)):
        assert BodyReaderRun([chunk(b"{}")], {"content-length": declared}).run().app_received


@pytest.mark.parametrize("encoding", ["gzip", "br", " Deflate "])
def test_a_compressed_body_is_415_naming_the_encoding(encoding: str) -> None:
    status, error = BodyReaderRun([chunk(b"{}")], {"content-encoding": encoding}).run().error()
    assert (status, error["code"]) == (415, "unsupported_encoding")
    name = encoding.strip().lower()
    assert error["message"] == (
        f"body: Content-Encoding '{name}' is not accepted; send the JSON uncompressed"
    )


@pytest.mark.parametrize("encoding", ["identity", " IDENTITY ", ""])
def test_an_identity_encoding_is_read(encoding: str) -> None:
    assert BodyReaderRun([chunk(b"{}")], {"content-encoding": encoding}).run().app_received


def test_a_body_that_stops_arriving_is_408_saying_how_much_came() -> None:
    run = BodyReaderRun([chunk(b'{"a', True)]).run(timeout=0.2)
    status, error = run.error()
    assert (status, error["code"]) == (408, "request_timeout")
    assert error["message"] == "body: not received within 0.2 s (3 bytes arrived)"


def test_the_read_timeout_bounds_the_whole_body_not_each_chunk() -> None:
    """A trickle: every chunk comes sooner than the timeout, the whole body does not."""
    trickle = [chunk(b" ", True) for _ in range(20)] + [chunk(b"{}")]
    status, error = BodyReaderRun(trickle, gap=0.05).run(timeout=0.3).error()
    assert (status, error["code"]) == (408, "request_timeout")
    assert error["message"].startswith("body: not received within 0.3 s (")


def test_a_client_that_leaves_before_its_body_gets_nothing_and_reaches_no_app() -> None:
    run = BodyReaderRun([chunk(b'{"a', True), {"type": "http.disconnect"}]).run()
    assert run.sent == [] and run.app_scope is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/generate"),
        ("HEAD", "/v1/generate"),
        ("OPTIONS", "/v1/generate"),
        ("POST", "/nowhere"),
    ],
)
def test_what_no_post_route_takes_passes_through_unread(method: str, path: str) -> None:
    """Not JSON, compressed, over the limit: none of it is the reader's business here."""
    garbage = chunk(b"\xff" * (LIMIT + 1))
    run = BodyReaderRun([garbage], {"content-encoding": "gzip"}).run(method, path)
    assert run.sent == [] and run.app_received == [garbage]
    assert run.app_scope is not None and run.app_scope["headers"] == [
        (b"content-encoding", b"gzip")
    ]


def test_a_missing_body_key_is_an_empty_chunk() -> None:
    run = BodyReaderRun([{"type": "http.request", "more_body": True}, chunk(b"{}")]).run()
    assert run.app_received == [chunk(b"{}")]
    status, error = BodyReaderRun([{"type": "http.request"}]).run().error()
    assert (status, error["code"]) == (400, "invalid_json")  # nothing is not a JSON document


def test_an_integer_of_at_most_the_digit_limit_is_read_and_one_digit_more_is_a_400() -> None:
    from palm_serve.server.request_body import MAX_INT_DIGITS, BodyError, check_json

    check_json(b'{"n": -' + b"9" * MAX_INT_DIGITS + b"}")  # the sign is not a digit
    with pytest.raises(BodyError) as refused:
        check_json(b'{"n": ' + b"9" * (MAX_INT_DIGITS + 1) + b"}")
    assert refused.value.message == (
        f"body: invalid JSON: integer of {MAX_INT_DIGITS + 1} digits (at most {MAX_INT_DIGITS})"
        " at character 6"
    )
