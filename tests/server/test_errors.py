"""Bad input gets a 4xx naming the field, never a 500 or a stack trace; API key (401),
body limit (413), full queue (429 + Retry-After), dead engine (503); the server serves
correctly afterwards."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from types import SimpleNamespace

import httpx
import pytest
from httpx_sse import aconnect_sse

from palm_serve.engine.errors import InvalidRequestError
from palm_serve.engine.outputs import RequestOutput
from palm_serve.server.errors import APIError
from palm_serve.server.generation import collect, engine_failure, failure_event
from palm_serve.server.metrics import Metrics

from server_helpers import metric, parse_metrics, running_server, write_model_dir

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
GEN, CMPL, CHAT = "/v1/generate", "/v1/completions", "/v1/chat/completions"
X = {"prompt": "x"}
ORIGIN = "https://app.example"

# (route, JSON body or raw bytes, expected status, text the message must contain)
MALFORMED = [
    (GEN, {"prompt": 5}, 400, "prompt"),
    (GEN, {**X, "max_tokens": -1}, 400, "max_tokens"),
    (GEN, {**X, "max_tokens": 10**12}, 400, "max_tokens"),
    (GEN, {**X, "max_tokens": "ten"}, 400, "max_tokens"),
    (GEN, {**X, "temperature": -0.5}, 400, "temperature"),
    (GEN, {**X, "top_p": 1.5}, 400, "top_p"),
    (GEN, {**X, "top_k": -5}, 400, "top_k"),
    (GEN, {**X, "min_p": 2}, 400, "min_p"),
    (GEN, {**X, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (GEN, {**X, "presence_penalty": 3}, 400, "presence_penalty"),
    (GEN, {**X, "logprobs": 50}, 400, "logprobs"),
    (GEN, {**X, "seed": -1}, 400, "seed"),
    (GEN, {"prompt": ""}, 400, "prompt"),
    (GEN, {"prompt": []}, 400, "prompt"),
    (GEN, {"prompt": [1, 999]}, 400, "prompt"),
    (GEN, {"prompt": "a" * 600, "max_tokens": 1}, 400, "600 tokens"),
    (GEN, {"prompt": "a" * 500, "max_tokens": 60}, 400, "512"),
    (GEN, {**X, "stop": 5}, 400, "stop"),
    (GEN, {**X, "stop": ["ok", 2]}, 400, "stop"),
    (GEN, {**X, "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    (GEN, {**X, "streem": True}, 400, "streem"),
    (GEN, b'{"prompt": "x", ', 400, "invalid JSON"),
    (GEN, b"null", 400, "body"),
    (GEN, [1, 2], 400, "body"),
    (GEN, {"prompt": "a" * 5000}, 413, "limit of 4096 bytes"),
    (CMPL, {**X, "n": 0}, 400, "n"),
    (CMPL, {**X, "max_tokens": 0}, 400, "max_tokens"),
    (CMPL, {**X, "logit_bias": {"5": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}, 400, "tools"),
]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    model_dir = write_model_dir(tmp_path_factory.mktemp("model") / "tiny")
    with running_server(
        model_dir, api_key=KEY, max_request_bytes=4096, max_tokens_limit=64, cors_origins=ORIGIN
    ) as server:
        yield server


def post(server, route: str, body, headers=AUTH) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{route}",
        content=raw,
        timeout=60,
        headers={"Content-Type": "application/json", **headers},
    )


def assert_error_shape(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    assert "Traceback" not in r.text
    return body["error"]


def test_malformed_requests_get_4xx_naming_the_field(keyed):
    for route, body, status, needle in MALFORMED:
        r = post(keyed, route, body)
        assert r.status_code == status, (route, body, r.text)
        assert needle in assert_error_shape(r)["message"], (route, body, r.text)
    good = post(keyed, GEN, {"prompt": "still works", "max_tokens": 5, "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 5


def test_chunked_body_over_the_limit_is_413(keyed):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = httpx.post(f"{keyed.url}{GEN}", content=chunks(), headers=AUTH, timeout=60)
    error = assert_error_shape(r)
    assert r.status_code == 413 and "limit" in error["message"]
    assert error["code"] == "request_too_large"


MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"


@pytest.mark.parametrize(
    "headers, code, message",
    [
        ({}, "missing_api_key", MISSING_KEY),
        ({"Authorization": "Bearer wrong"}, "invalid_api_key", "invalid API key"),
        ({"Authorization": f"Basic {KEY}"}, "missing_api_key", MISSING_KEY),
    ],
)
def test_api_key_required(keyed, headers, code, message):
    for route in (GEN, CMPL, CHAT):
        r = post(keyed, route, {"prompt": "x", "messages": []}, headers=headers)
        error = assert_error_shape(r)
        # The message is what a person reads in a client's exception: it says what to send.
        assert r.status_code == 401 and (error["code"], error["message"]) == (code, message)
        assert r.headers["www-authenticate"] == "Bearer"  # RFC 6750's challenge
    assert httpx.get(f"{keyed.url}/v1/models", headers=headers).status_code == 401
    # Liveness, readiness and scraping stay open (probes and Prometheus carry no key).
    for route in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{keyed.url}{route}", headers=headers).status_code == 200


def test_full_queue_is_429_with_retry_after_then_dead_engine_is_503(tmp_path):
    model_dir = write_model_dir(tmp_path / "long", max_positions=4096)
    with running_server(model_dir, max_num_seqs=1, max_queue=1, max_tokens_limit=4000) as s:
        asyncio.run(_fill_queue_then_overflow(s))
        s.run(s.engine.shutdown())  # what a crashed step loop looks like from outside
        assert httpx.get(f"{s.url}/ready").status_code == 503
        r = httpx.post(f"{s.url}{GEN}", json={"prompt": "x"})
        assert r.status_code == 503 and "engine" in assert_error_shape(r)["message"]
        assert httpx.get(f"{s.url}/health").status_code == 200


async def _fill_queue_then_overflow(s) -> None:
    long = {"max_tokens": 4000, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
        async with aconnect_sse(client, "POST", GEN, json={"prompt": "A", **long}) as a:
            events = a.aiter_sse()
            await anext(events)  # A runs (max_num_seqs=1)
            b = asyncio.ensure_future(client.post(GEN, json={"prompt": "B", **long}))
            await _until_waiting(client, 1)  # B waits: the queue (max_queue=1) is full
            r = await client.post(GEN, json={"prompt": "C", "max_tokens": 1})
            assert r.status_code == 429, r.text
            assert r.headers["Retry-After"] == "1"
            assert assert_error_shape(r)["type"] == "rate_limit_error"
            assert not b.done()  # A was still running: the 429 came from the full queue
            b.cancel()


async def _until_waiting(client: httpx.AsyncClient, n: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (
        metric(parse_metrics((await client.get("/metrics")).text), "palm_num_requests_waiting") != n
    ):
        assert time.monotonic() < deadline, "the second request never queued"
        await asyncio.sleep(0.02)


def test_cors_for_the_configured_origin_only(keyed):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(f"{keyed.url}{GEN}", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        f"{keyed.url}{GEN}", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    r = post(keyed, GEN, {"prompt": "x", "max_tokens": 1}, headers={**AUTH, "Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
@pytest.mark.parametrize("spacing", [" ", "   "])
def test_the_bearer_scheme_is_case_insensitive_and_the_key_trimmed(keyed, scheme, spacing):
    headers = {"Authorization": f"{scheme}{spacing}{KEY}"}
    assert post(keyed, GEN, {"prompt": "x", "max_tokens": 1}, headers=headers).status_code == 200


def test_an_options_request_needs_no_key(keyed):
    """Not a CORS preflight (no Access-Control-Request-Method), so the CORS layer passes it
    on: the key check lets OPTIONS through to the router, which has no OPTIONS route."""
    assert httpx.options(f"{keyed.url}{GEN}").status_code == 405


def test_an_engine_failure_is_a_503_naming_its_reason():
    """What a client gets when the core failed or died under its request (the fault
    tests in test_core_faults.py reach it end to end)."""
    err = engine_failure("engine step failed: RuntimeError")
    assert (err.status, err.type, err.code) == (503, "service_unavailable", "engine_error")
    assert err.message == "the engine failed this request: engine step failed: RuntimeError"
    assert engine_failure(None).message == "the engine failed this request: no reason given"
    event = failure_event(SimpleNamespace(finish_reason="error", error="core died"))
    assert event is not None and event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[len(b"data: ") :])["error"] == {
        "message": "the engine failed this request: core died",
        "type": "service_unavailable",
        "code": "engine_error",
        "param": None,
    }
    assert failure_event(SimpleNamespace(finish_reason="stop", error=None)) is None


class FakeRequest:
    """What collect asks of a starlette Request: whether its client has gone."""

    def __init__(self, gone: bool = False) -> None:
        self.gone = gone

    async def is_disconnected(self) -> bool:
        return self.gone


async def _outputs(outputs: list[RequestOutput], closed: list[bool], then_wait: bool = False):
    try:
        for out in outputs:
            await asyncio.sleep(0)
            yield out
        if then_wait:
            await asyncio.Event().wait()  # a request still running when its client leaves
    finally:
        closed.append(True)


def test_collect_adds_up_the_outputs_and_an_engine_failure_is_a_503_naming_it():
    tokens = [
        RequestOutput("r", [5], "a", prompt_logprobs=[None, {"t": 1}]),  # type: ignore[list-item]
        RequestOutput("r", [6, 7], "bc", logprobs=["x", "y"]),  # type: ignore[list-item]
        RequestOutput("r", [], "", finished=True, finish_reason="stop", stop_reason="z"),
    ]
    closed: list[bool] = []
    got = asyncio.run(collect(_outputs(tokens, closed), FakeRequest()))
    assert (got.text, got.token_ids, got.logprobs) == ("abc", [5, 6, 7], ["x", "y"])
    assert got.prompt_logprobs == [None, {"t": 1}] and closed == [True]
    assert (got.finish_reason, got.stop_reason, got.error) == ("stop", "z", None)

    failed = tokens[:2] + [
        RequestOutput("r", [], "", finished=True, finish_reason="error", error="core died")
    ]
    with pytest.raises(APIError) as raised:
        asyncio.run(collect(_outputs(failed, []), FakeRequest()))
    assert (raised.value.status, raised.value.code) == (503, "engine_error")
    assert raised.value.message == "the engine failed this request: core died"


def test_collect_stops_a_request_whose_client_left_with_a_499():
    closed: list[bool] = []
    started = [RequestOutput("r", [5], "a")]
    with pytest.raises(APIError) as raised:
        # Bounded: collect that never looks at its client would wait here for ever.
        gone = collect(_outputs(started, closed, then_wait=True), FakeRequest(gone=True))
        asyncio.run(asyncio.wait_for(gone, 10))
    assert (raised.value.status, raised.value.code) == (499, "client_closed")
    assert raised.value.message == "client closed the request"  # what the access log shows
    assert closed == [True]  # closing the engine's stream is what aborts the request


def test_the_api_docs_stay_open_with_a_key(keyed):
    for route in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{keyed.url}{route}", timeout=60).status_code == 200, route


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(keyed):
    base = json.dumps({"prompt": "x", "max_tokens": 1, "stop": ""}).encode()
    pad = 4096 - len(base)
    exact = json.dumps({"prompt": "x", "max_tokens": 1, "stop": "y" * pad}).encode()
    assert len(exact) == 4096
    r = post(keyed, GEN, exact)
    assert r.status_code == 200, r.text
    over = json.dumps({"prompt": "x", "max_tokens": 1, "stop": "y" * (pad + 1)}).encode()
    assert post(keyed, GEN, over).status_code == 413


def test_requests_to_unknown_routes_share_one_metric_label(keyed):
    from server_helpers import metric, parse_metrics

    for path in ("/nope", "/v1/nope/123", "/x" * 30):
        assert httpx.post(f"{keyed.url}{path}", headers=AUTH, timeout=60).status_code == 404
    m = parse_metrics(httpx.get(f"{keyed.url}/metrics", timeout=60).text)
    labels = {dict(k[1])["route"] for k in m if k[0] == "palm_http_requests_total"}
    assert "unmatched" in labels and not any(label.startswith("/x") for label in labels)
    assert metric(m, "palm_http_requests_total", method="POST", route="unmatched",
                  status="404") == 3  # fmt: skip


def _routes() -> list:
    """A FastAPI app's routes as ours are: the docs' own, then included routers kept whole."""
    from fastapi import APIRouter, FastAPI

    router = APIRouter()
    router.add_api_route("/v1/generate", lambda: None, methods=["POST"])
    router.add_api_route("/v1/models/{model_id}", lambda model_id: None, methods=["GET"])
    app = FastAPI()
    app.include_router(router)
    return app.routes


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("POST", "/v1/generate", "/v1/generate"),
        ("GET", "/v1/generate", "/v1/generate"),  # the wrong method still aims at the route
        ("GET", "/v1/models/tiny", "/v1/models/{model_id}"),
        ("GET", "/docs", "/docs"),
        ("POST", "/v1/generate/extra", None),
        ("GET", "/nowhere", None),
    ],
)
def test_a_request_is_labelled_with_the_template_of_the_route_it_aims_at(method, path, template):
    from palm_serve.server.middleware import match_route, route_template

    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    assert match_route(_routes(), scope) == template
    assert route_template(scope, _routes()) == (template or "unmatched")
    # Once routed, the router's own choice is the label.
    assert route_template({**scope, "route": SimpleNamespace(path="/chosen")}, []) == "/chosen"
    # A routed endpoint without a path template (a mount's app): the aim, as before routing.
    assert route_template({**scope, "route": SimpleNamespace()}, _routes()) == (
        template or "unmatched"
    )


def _metered(app) -> tuple[Metrics, Callable[[dict], Awaitable[None]]]:
    from palm_serve.engine.stats import EngineStats
    from palm_serve.server.middleware import HTTPMetricsMiddleware

    metrics = Metrics(EngineStats, lambda: 0)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def call(scope: dict) -> None:
        await HTTPMetricsMiddleware(app, metrics, _routes())(scope, None, send)

    return metrics, call


def _counted(metrics: Metrics, method: str, route: str, status: str) -> tuple[float, float]:
    labels = {"method": method, "route": route, "status": status}
    r = metrics.registry
    return (
        r.get_sample_value("palm_http_requests_total", labels) or 0.0,
        r.get_sample_value("palm_http_request_duration_seconds_count", labels) or 0.0,
    )


@pytest.mark.parametrize(
    ("behaviour", "status"), [("answers", "201"), ("fails", "500"), ("leaves", "499")]
)
def test_every_request_is_counted_and_timed_once_with_its_status(behaviour, status):
    async def app(scope, receive, send) -> None:
        if behaviour == "answers":
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif behaviour == "fails":
            raise ValueError("the app's own bug")
        # "leaves": the client went away before anything was answered

    metrics, call = _metered(app)
    scope = {"type": "http", "method": "GET", "path": "/v1/models/tiny", "root_path": ""}
    before = time.monotonic()
    if behaviour == "fails":
        with pytest.raises(ValueError):  # reported (and answered) by the error middleware
            asyncio.run(call(scope))
    else:
        asyncio.run(call(scope))
    elapsed = time.monotonic() - before
    assert _counted(metrics, "GET", "/v1/models/{model_id}", status) == (1.0, 1.0)
    labels = {"method": "GET", "route": "/v1/models/{model_id}", "status": status}
    observed = metrics.registry.get_sample_value("palm_http_request_duration_seconds_sum", labels)
    assert observed is not None and 0 <= observed <= elapsed  # the request's own duration
    others = [s for s in ("200", "201", "499", "500") if s != status]
    assert all(_counted(metrics, "GET", "/v1/models/{model_id}", s) == (0, 0) for s in others)


def test_what_is_not_http_is_not_counted():
    async def app(scope, receive, send) -> None:
        await send({"type": "lifespan.startup.complete"})

    metrics, call = _metered(app)
    asyncio.run(call({"type": "lifespan"}))
    assert not any(
        s.name.startswith("palm_http_request") and s.name.endswith(("_total", "_count")) and s.value
        for family in metrics.registry.collect()
        for s in family.samples
    )


def _admission(max_num_seqs=4, max_queue=2, status="ready", inflight=0, draining=False):
    from palm_serve.server.lifecycle import Lifecycle

    lifecycle = Lifecycle()
    lifecycle.draining = draining
    held = [lifecycle.admit() for _ in range(inflight)]
    state = SimpleNamespace(
        settings=SimpleNamespace(max_num_seqs=max_num_seqs, max_queue=max_queue),
        lifecycle=lifecycle,
        engine=SimpleNamespace(status=status),
    )
    return state, held


def test_admission_takes_up_to_running_plus_waiting_sequences_all_or_none():
    from palm_serve.server.generation import admit

    state, _ = _admission(inflight=2)
    tickets = admit(state, 4)  # exactly the room left: 2 + 4 = 4 running + 2 waiting
    assert len(tickets) == 4 and state.lifecycle.inflight == 6
    for ticket in tickets:
        ticket.release()
    assert state.lifecycle.inflight == 2
    with pytest.raises(APIError) as full:
        admit(state, 5)
    e = full.value
    assert (e.status, e.type, e.code, e.headers) == (
        429,
        "rate_limit_error",
        "queue_full",
        {"Retry-After": "1"},
    )
    assert e.message == (
        "too many requests: 2 sequences are running or waiting and this request needs 5 more "
        "(room for 6); retry later"
    )
    assert state.lifecycle.inflight == 2  # nothing taken by a refused request


def test_a_request_that_can_never_fit_is_a_400_naming_n_and_why():
    from palm_serve.server.generation import admit

    state, _ = _admission()
    assert len(admit(state, 6)) == 6  # exactly the capacity fits when nothing runs
    state, _ = _admission()
    with pytest.raises(APIError) as alone:  # one prompt: nothing to say about a fan-out
        admit(state, 7)
    assert alone.value.message.startswith("n: this request needs 7 sequences; this server")
    with pytest.raises(APIError) as never:
        admit(state, 7, " (2 prompts x n=4)")
    e = never.value
    assert (e.status, e.code, e.param) == (400, "invalid_parameter", "n")
    assert e.message == (
        "n: this request needs 7 sequences (2 prompts x n=4); this server holds at most 6 at "
        "once (max_num_seqs 4 running + max_queue 2 waiting)"
    )


@pytest.mark.parametrize(
    ("status", "draining", "code", "message", "headers"),
    [
        ("ready", True, "unavailable", "the server is shutting down; retry on another replica",
         None),
        ("restarting", False, "engine_restarting", "the engine core is restarting; retry shortly",
         {"Retry-After": "1"}),
        ("dead", False, "unavailable", "the engine has stopped; no request can be served", None),
        ("stopped", False, "unavailable", "the engine has stopped; no request can be served",
         None),
    ],
)  # fmt: skip
def test_admission_refuses_while_draining_or_without_an_engine(
    status, draining, code, message, headers
):
    from palm_serve.server.generation import admit

    state, _ = _admission(status=status, draining=draining)
    with pytest.raises(APIError) as refused:
        admit(state, 1)
    e = refused.value
    assert (e.status, e.type, e.code, e.message, e.headers) == (
        503,
        "service_unavailable",
        code,
        message,
        headers,
    )
    assert state.lifecycle.inflight == 0


def test_sampling_params_refused_are_a_400_naming_the_field():
    from palm_serve.server.generation import make_params

    with pytest.raises(APIError) as refused:
        make_params(max_tokens=4, temperature=-1.0)
    e = refused.value
    assert (e.status, e.param) == (400, "temperature")
    assert e.message.startswith("temperature ") and e.message == str(e)
    assert make_params(max_tokens=3, temperature=0.5).temperature == 0.5


def _served(
    outs: list[RequestOutput], stop_after: int | None = None, stalled=False, log_requests=True
):
    """outputs() over an engine that yields `outs`; the consumer stops after `stop_after`."""
    from palm_serve.engine.messages import EngineCoreRequest
    from palm_serve.engine.sampling_params import SamplingParams
    from palm_serve.engine.stats import EngineStats
    from palm_serve.server.generation import Outcome, outputs
    from palm_serve.server.lifecycle import Lifecycle
    from palm_serve.server.request_context import RequestContext

    closed: list[bool] = []

    async def generate(request):
        try:
            for out in outs:
                yield out
        finally:
            closed.append(True)

    metrics = Metrics(EngineStats, lambda: 0)
    settings = SimpleNamespace(log_requests=log_requests)
    state = SimpleNamespace(
        metrics=metrics, engine=SimpleNamespace(generate=generate), settings=settings
    )
    lifecycle = Lifecycle()
    context = RequestContext("rid")
    request = EngineCoreRequest("r", [1, 2, 3], SamplingParams(max_tokens=4), 0.0)
    stream = outputs(state, request, lifecycle.admit(), Outcome(stalled=stalled), context)

    async def consume() -> list[RequestOutput]:
        got = []
        async with aclosing(stream) as s:
            async for out in s:
                got.append(out)
                if len(got) == stop_after:
                    break
        return got

    got = asyncio.run(consume())
    finished = {
        reason: metrics.registry.get_sample_value(
            "palm_requests_finished_total", {"finish_reason": reason}
        )
        for reason in ("stop", "length", "abort", "stalled")
    }
    return got, closed, lifecycle, context, metrics, finished


def test_a_request_served_whole_is_counted_once_with_its_reason_and_logged(caplog):
    outs = [
        RequestOutput("r", [5], "he"),
        RequestOutput("r", [], ""),  # an output without a token (a held-back stop string)
        RequestOutput("r", [6, 7, 8], "llo", finished=True, finish_reason="length"),
    ]
    with caplog.at_level(logging.INFO, logger="palm_serve.requests"):
        got, closed, lifecycle, context, metrics, finished = _served(outs)
    assert got == outs and closed == [True] and lifecycle.inflight == 0
    assert (context.completion_tokens, context.finish_reasons) == (4, ["length"])
    assert finished == {"stop": 0, "length": 1, "abort": 0, "stalled": 0}
    samples = metrics.registry.get_sample_value
    assert samples("palm_prompt_tokens_total") == 3
    assert samples("palm_generation_tokens_total") == 4
    assert [r.getMessage() for r in caplog.records] == ["output of r: 'hello'"]


@pytest.mark.parametrize("stalled", [False, True])
def test_a_request_left_early_is_aborted_and_counted_as_abort_or_stalled(stalled):
    outs = [
        RequestOutput("r", [5], "a"),
        RequestOutput("r", [6], "b"),
        RequestOutput("r", [7], "c"),
    ]
    got, closed, lifecycle, context, _, finished = _served(outs, stop_after=1, stalled=stalled)
    reason = "stalled" if stalled else "abort"
    assert len(got) == 1 and closed == [True] and lifecycle.inflight == 0
    assert context.finish_reasons == [reason]
    assert finished == {"stop": 0, "length": 0, "abort": 0, "stalled": 0} | {reason: 1}


def test_a_finished_output_without_a_reason_counts_as_stop():
    outs = [RequestOutput("r", [5], "a", finished=True)]
    *_, context, _, finished = _served(outs)
    assert context.finish_reasons == ["stop"] and finished["stop"] == 1


def test_without_log_requests_no_output_text_is_logged(caplog):
    outs = [RequestOutput("r", [5], "secret text", finished=True, finish_reason="length")]
    with caplog.at_level(logging.DEBUG, logger="palm_serve.requests"):
        got, *_ = _served(outs, log_requests=False)
    assert got == outs and caplog.records == []


def _tokenizing_state(log_requests: bool, refuse: bool = False):
    asked: list[tuple] = []

    def tokenize(prompt, param):
        asked.append((prompt, param))
        if refuse:
            raise InvalidRequestError(f"{param}: lone surrogate", param)
        return [1, 2, 3]

    settings = SimpleNamespace(log_requests=log_requests)
    return SimpleNamespace(settings=settings, engine=SimpleNamespace(tokenize=tokenize)), asked


def test_tokenize_counts_every_prompt_token_and_logs_the_prompt_only_when_asked(caplog):
    from palm_serve.server.generation import tokenize
    from palm_serve.server.request_context import RequestContext, serving

    state, asked = _tokenizing_state(log_requests=True)
    with (
        serving(RequestContext("rid")) as context,
        caplog.at_level(logging.INFO, logger="palm_serve.requests"),
    ):
        assert tokenize(state, "hi") == [1, 2, 3]
        assert tokenize(state, [7, 8], "input") == [1, 2, 3]
    assert asked == [("hi", "prompt"), ([7, 8], "input")]
    assert context.prompt_tokens == 6
    assert [r.getMessage() for r in caplog.records] == ["prompt: 'hi'", "input: [7, 8]"]
    caplog.clear()
    quiet, _ = _tokenizing_state(log_requests=False)
    with caplog.at_level(logging.DEBUG, logger="palm_serve.requests"):
        tokenize(quiet, "hi")
    assert caplog.records == []


def test_a_prompt_the_engine_refuses_is_a_400_naming_its_field():
    from palm_serve.server.generation import tokenize

    state, _ = _tokenizing_state(log_requests=False, refuse=True)
    with pytest.raises(APIError) as refused:
        tokenize(state, "x", "messages")
    e = refused.value
    assert (e.status, e.param, e.message) == (400, "messages", "messages: lone surrogate")
