"""Request ids over real HTTP: a client's valid X-Request-Id is the request's id (returned in
the X-Request-Id header and in the body's `id` as prefix-id), a missing one is generated,
an invalid one is a 400 naming the header; every answer, errors included, carries the
header; two requests sending the same id at once both run (the engine ids stay unique)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from httpx_sse import connect_sse

from server_helpers import model_dir, oracle, server  # noqa: F401 - fixtures

HEADER = "X-Request-Id"
GENERATED = re.compile(r"[0-9a-f]{32}")


def _post(server, path: str, body: dict, request_id: str | None = None) -> httpx.Response:  # noqa: F811
    headers = {HEADER: request_id} if request_id is not None else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


ROUTES = [
    ("/v1/generate", {"prompt": "ab", "max_tokens": 2}, "gen"),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 2}, "cmpl"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 2},
        "chatcmpl",
    ),  # noqa: E501
]


@pytest.mark.parametrize(("path", "body", "prefix"), ROUTES)
def test_the_clients_id_is_the_header_and_the_body_id(server, path, body, prefix) -> None:  # noqa: F811
    given = "client-7.a:b_c-" + "x" * 113  # 128 characters: the longest allowed
    r = _post(server, path, body, given)
    assert r.status_code == 200, r.text
    assert r.headers[HEADER] == given
    assert r.json()["id"] == f"{prefix}-{given}"


@pytest.mark.parametrize(("path", "body", "prefix"), ROUTES)
def test_streamed_events_carry_the_id(server, path, body, prefix) -> None:  # noqa: F811
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(
            client, "POST", f"{server.url}{path}", json={**body, "stream": True},
            headers={HEADER: "s-1"},
        ) as source,
    ):  # fmt: skip
        assert source.response.headers[HEADER] == "s-1"
        ids = {e.json()["id"] for e in source.iter_sse() if e.data != "[DONE]"}
    assert ids == {f"{prefix}-s-1"}


def test_without_a_header_an_id_is_generated(server) -> None:  # noqa: F811
    first, second = (_post(server, *ROUTES[0][:2]) for _ in range(2))
    ids = [r.headers[HEADER] for r in (first, second)]
    assert all(GENERATED.fullmatch(i) for i in ids) and ids[0] != ids[1]
    assert first.json()["id"] == f"gen-{ids[0]}"


@pytest.mark.parametrize(
    "bad", ["x" * 129, "has space", "a/b", "semi;colon", "caf\u00e9", "", "id#1"]
)
def test_an_invalid_id_is_a_400_naming_the_header(server, bad: str) -> None:  # noqa: F811
    raw = bad.encode()
    r = httpx.post(
        f"{server.url}/v1/generate",
        json={"prompt": "ab"},
        headers=[(b"x-request-id", raw)],
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == HEADER and error["code"] == "invalid_request_id"
    assert error["message"].startswith(f"{HEADER}: must be at most 128 characters")
    assert GENERATED.fullmatch(r.headers[HEADER])  # the answer still has an id


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/generate", b"{not json", 400),  # answered by the body middleware
        ("POST", "/v1/generate", b'{"prompt": "ab", "top_p": 7}', 400),  # by validation
        ("GET", "/nowhere", b"", 404),
        ("GET", "/health", b"", 200),
    ],
)
def test_every_answer_carries_the_id(server, method, path, content, status) -> None:  # noqa: F811
    r = httpx.request(
        method, f"{server.url}{path}", content=content, headers={HEADER: "e-1"}, timeout=30
    )
    assert r.status_code == status, r.text
    assert r.headers[HEADER] == "e-1"


def test_the_same_id_twice_at_once_runs_both(server, oracle) -> None:  # noqa: F811
    """Both requests are in the engine together (ignore_eos, hundreds of tokens): had they
    the same engine id, the second would be refused or the outputs mixed."""
    prompts = ["first prompt", "second, other prompt"]

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{server.url}/v1/generate",
                        json={"prompt": p, "max_tokens": 200, "ignore_eos": True, "temperature": 0},
                        headers={HEADER: "same"},
                    )
                    for p in prompts
                )
            )

    for prompt, r in zip(prompts, asyncio.run(both()), strict=True):
        assert r.status_code == 200, r.text
        assert r.headers[HEADER] == "same" and r.json()["id"] == "gen-same"
        assert r.json()["token_ids"] == oracle.greedy(prompt, 200)
