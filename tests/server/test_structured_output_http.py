"""Structured output over HTTP with the shipped default model, its core in a process of
its own (the spec crosses the seam): the `openai` client's response_format (json_schema,
json_object, a pydantic model through parse()) unchanged; vLLM's structured_outputs on
/v1/generate and the OpenAI routes; a spec that cannot compile is a 400 naming the field
and the reason."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

import palm_serve.model

from server_helpers import ServerThread, running_server

MODEL_DIR = Path(palm_serve.model.__file__).parent / "default"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tribe": {"enum": ["Judah", "Levi", "Benjamin"]},
    },
    "required": ["name", "age", "tribe"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(MODEL_DIR) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def post(server: ServerThread, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def test_openai_chat_response_format_json_schema(client):
    for seed in range(4):
        r = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Who went up to Jerusalem?"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
            max_tokens=60,
            seed=seed,
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    tribe: Literal["Judah", "Levi", "Benjamin"]


def test_openai_parse_with_a_pydantic_model(client):
    """The client's own schema from a pydantic model, parsed back by the client."""
    r = client.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": "Name a man of Israel."}],
        response_format=Person,
        max_tokens=60,
        seed=3,
    )
    assert isinstance(r.choices[0].message.parsed, Person)


def test_openai_completions_json_object_and_streaming(client):
    whole = client.completions.create(
        model="default",
        prompt="And the LORD said unto Moses, ",
        # The legacy completions call has no response_format argument; vLLM takes it there.
        extra_body={"response_format": {"type": "json_object"}},
        max_tokens=120,
        seed=1,
    )
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(whole.choices[0].text), dict)
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Who?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        max_tokens=60,
        seed=2,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_structured_outputs_on_every_route(server):
    choice = {"choice": ["Moses", "Aaron", "Pharaoh"]}
    for seed in range(3):
        r = post(
            server, "/v1/generate", {"prompt": "And ", "seed": seed, "structured_outputs": choice}
        )
        assert r.status_code == 200 and r.json()["text"] in choice["choice"]
        assert r.json()["finish_reason"] == "stop"
    regex = r"[0-9]{3}-[0-9]{4}"
    r = post(
        server,
        "/v1/completions",
        {"prompt": "Call ", "max_tokens": 20, "structured_outputs": {"regex": regex}},
    )
    assert re.fullmatch(regex, r.json()["choices"][0]["text"]), r.text
    grammar = 'start: "The " name " is " verb\nname: "LORD" | "king"\nverb: "good" | "come"'
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Say it."}],
            "max_tokens": 20,
            "structured_outputs": {"grammar": grammar},
        },
    )
    text = r.json()["choices"][0]["message"]["content"]
    assert re.fullmatch(r"The (LORD|king) is (good|come)", text), r.text
    r = post(
        server,
        "/v1/generate",
        {"prompt": "{", "max_tokens": 60, "seed": 5, "structured_outputs": {"json": PERSON}},
    )
    jsonschema.validate(json.loads(r.json()["text"]), PERSON)


CHAT, GEN, CMPL = "/v1/chat/completions", "/v1/generate", "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
SO = "structured_outputs"
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
BAD = [
    (CHAT, {"response_format": BAD_SCHEMA}, "response_format.json_schema.schema", "strin"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    (GEN, {SO: {"regex": "[0-9]{3}-("}}, f"{SO}.regex", "unclosed group"),
    (CMPL, {SO: {"grammar": 'start: foo\nfoo: "x" bar'}}, f"{SO}.grammar", 'unknown name: "bar"'),
    (GEN, {SO: {"json": "{oops"}}, f"{SO}.json", "not valid JSON"),
    (GEN, {SO: {"regex": "a", "choice": ["b"]}}, SO, "exactly one"),
    (GEN, {SO: {"choice": []}}, f"{SO}.choice", "at least 1"),
    (GEN, {SO: {"regexp": "a"}}, f"{SO}.regexp", "Extra"),
    (CHAT, {"response_format": {"type": "json_object"}, SO: {"regex": "a"}}, SO, "not both"),
]


@pytest.mark.parametrize(("route", "fields", "param", "reason"), BAD)
def test_a_bad_spec_is_a_400_naming_the_field(server, route, fields, param, reason):
    body = {"prompt": "x", **fields} if route != CHAT else {"messages": MESSAGES, **fields}
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and reason in error["message"], error
    assert error["message"].startswith(param), error
