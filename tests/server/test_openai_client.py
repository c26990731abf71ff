"""The `openai` package against our OpenAI-compatible routes, streaming and not; echo +
logprobs (prompt scoring) against the dense log-softmax, i.e. perplexity over HTTP."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from palm_serve.server.chat_template import ChatTemplate

from server_helpers import model_dir, oracle, running_server, server  # noqa: F401


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def plain_generate(server, prompt: str, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": prompt, **body}, timeout=60)
    return r.json()


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_equals_our_generate(client, server):
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0)
    ours = plain_generate(server, "Hello", max_tokens=10, temperature=0)
    assert c.choices[0].text == ours["text"]
    assert c.choices[0].finish_reason == ours["finish_reason"]
    assert c.usage.completion_tokens == ours["usage"]["completion_tokens"]


def test_completion_stream_with_usage(client):
    whole = client.completions.create(model="tiny", prompt="Stream", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Stream",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.text for c in chunks for ch in c.choices)
    assert text == whole.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_several_prompts_and_n(client, oracle):
    c = client.completions.create(
        model="tiny", prompt=["One", "Two"], n=2, max_tokens=4, temperature=0, stop=[]
    )
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    # Choice k answers prompt k // n: every choice of every prompt is its greedy text.
    for k, prompt in enumerate(["One", "One", "Two", "Two"]):
        expected = oracle.tokenizer.decode(oracle.greedy(prompt, 4))
        assert c.choices[k].text == expected, (k, prompt)
    assert c.usage.prompt_tokens == 6 and c.usage.completion_tokens == 16


def test_echo_logprobs_score_the_prompt(client, oracle):
    """max_tokens=0 + echo + logprobs: the held-out perplexity recipe."""
    text = "The held-out text to score."
    c = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = c.choices[0].logprobs
    ids = list(text.encode())
    assert c.choices[0].text == text and lp.tokens == [chr(i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.text_offset == list(range(len(ids)))
    ref = oracle.logprobs(ids)
    expected = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    pairs = zip(lp.token_logprobs[1:], expected, strict=True)
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in pairs)
    nll = -sum(lp.token_logprobs[1:]) / (len(ids) - 1)
    assert math.isclose(math.exp(nll), math.exp(-sum(expected) / len(expected)), rel_tol=1e-4)


def test_echo_with_generation(client):
    c = client.completions.create(
        model="tiny", prompt="Echo", max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    lp = c.choices[0].logprobs
    assert c.choices[0].text.startswith("Echo") and len(lp.tokens) == 4 + 3
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])


def test_chat_equals_completion_of_the_template(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    prompt = ChatTemplate.load(None).render(messages)
    comp = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0, stop=["\nUser:"]
    )
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt.encode())


def test_chat_stream(client):
    messages = [{"role": "user", "content": "Stream a reply"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": "x"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(
        len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content
    )


def test_unknown_fields_are_ignored_and_unsupported_ones_refused(client, server):
    c = client.completions.create(
        model="tiny",
        prompt="x",
        max_tokens=2,
        user="me",
        extra_body={"some_future_field": 1, "store": False},
    )
    assert len(c.choices) == 1
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, suffix="y")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_chat_template_file_replaces_the_built_in_one(model_dir, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}>")
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = "<user>Hi there\n>"
    with running_server(model_dir, chat_template=template) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0
        )
        comp = client.completions.create(model="tiny", prompt=rendered, max_tokens=6, temperature=0)
    assert chat.usage.prompt_tokens == len(rendered.encode())
    assert chat.choices[0].message.content == comp.choices[0].text
