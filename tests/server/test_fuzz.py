"""Property: whatever a client sends to a generation route, the answer is never a 5xx,
every 4xx is the JSON error shape naming its field, and the same keep-alive connection
still answers a valid request afterwards. Bodies mix the routes' real fields with
arbitrary JSON: any unicode (lone surrogates, NUL), huge and tiny numbers, NaN and
infinities, deep nesting."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raw_http import RawConnection

from server_helpers import model_dir, running_server  # noqa: F401

ROUTES = {
    "/v1/generate": ["prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                     "stream", "logprobs", "repetition_penalty", "min_p", "stop_token_ids"],
    "/v1/completions": ["prompt", "max_tokens", "n", "echo", "logprobs", "stream", "temperature",
                        "stop", "seed", "best_of", "stream_options", "model"],
    "/v1/chat/completions": ["messages", "max_tokens", "n", "temperature", "logprobs",
                             "top_logprobs", "stream", "stop", "response_format", "model"],
}  # fmt: skip
VALID = json.dumps({"prompt": "ok", "max_tokens": 1}).encode()

text = st.text(st.characters(codec=None, categories=None), max_size=12) | st.sampled_from(
    ["\ud800", "a\x00b", "", "\U0001f600", "\udfff\ud800"]
)
numbers = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | (st.sampled_from([1e-300, -0.0, 1e-38, 1e308, 2**63, -1, 0, 1]))
)
leaves = st.none() | st.booleans() | numbers | text
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": values}
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    route = draw(st.sampled_from(sorted(ROUTES)))
    fields = draw(st.lists(st.sampled_from(ROUTES[route]), unique=True, max_size=6))
    body = {name: draw(values) for name in fields}
    if route == "/v1/chat/completions" and draw(st.booleans()):
        body["messages"] = draw(st.lists(message, min_size=1, max_size=3))
    elif draw(st.booleans()):
        body["prompt"] = draw(text)
    if draw(st.booleans()):
        body[draw(text)] = draw(values)  # an unknown field
    raw = json.dumps(draw(st.sampled_from([body, draw(values)])) if draw(st.booleans())
                     else body, allow_nan=True)  # fmt: skip
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.integers(500, 20_000))
        raw = "[" * depth + "]" * depth
    return route, raw.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def fuzz_server(model_dir):  # noqa: F811
    # Small limits keep any valid request that hypothesis finds short.
    with running_server(model_dir, max_tokens_limit=4, num_kv_blocks=256) as s:
        yield s


@pytest.fixture(scope="module")
def connection(fuzz_server):
    raw = RawConnection(fuzz_server.url)
    yield raw
    raw.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=bodies())
def test_no_body_is_a_server_error_and_the_connection_survives(connection, case) -> None:
    route, body = case
    answer = connection.request("POST", route, body, {"content-type": "application/json"})
    assert answer.status < 500, (route, body[:200], answer.body[:300])
    if answer.status >= 400:
        error = json.loads(answer.body)["error"]
        assert set(error) == {"message", "type", "code", "param"} and error["message"]
    after = connection.request("POST", "/v1/generate", VALID, {"content-type": "application/json"})
    assert after.status == 200, after.body
