"""/v1/generate over real HTTP: JSON and SSE, against the dense no-cache greedy oracle;
the SSE stream (parsed by httpx-sse, and by curl) reassembles to the non-streaming text."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import json
import math
import shutil
import subprocess

import httpx
import pytest
from httpx_sse import connect_sse

from server_helpers import model_dir, oracle, server  # noqa: F401

PROMPTS = ["Hello", "The quick brown fox", "héllo wörld ✓ ", "a", "0123456789" * 3]


def generate(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(server, **body) -> list[dict | str]:
    events = []
    with httpx.Client(timeout=60) as client:
        with connect_sse(
            client, "POST", f"{server.url}/v1/generate", json={**body, "stream": True}
        ) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for sse in source.iter_sse():
                events.append(sse.data if sse.data == "[DONE]" else json.loads(sse.data))
    return events


def test_health_ready_models(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 512


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_the_dense_oracle(server, oracle, prompt):
    out = generate(server, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert out["token_ids"] == oracle.greedy(prompt, 12)
    assert out["text"] == oracle.tokenizer.decode(out["token_ids"])
    n_prompt = len(prompt.encode())
    assert out["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 12,
        "total_tokens": n_prompt + 12,
    }
    assert out["finish_reason"] == "length"


def test_token_id_prompt(server, oracle):
    ids = [72, 105, 33, 200, 7]
    out = generate(server, prompt=ids, max_tokens=6, temperature=0, ignore_eos=True)
    assert out["token_ids"] == oracle.greedy(ids, 6)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_reassembles_to_the_non_streaming_text(server, prompt):
    body = dict(prompt=prompt, max_tokens=20, temperature=0)
    whole = generate(server, **body)
    events = stream_events(server, **body)
    assert events[-1] == "[DONE]"
    *tokens, last = events[:-1]
    assert "".join(e["text"] for e in events[:-1]) == whole["text"]
    assert [e["token_id"] for e in tokens] == whole["token_ids"]
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["usage"] == whole["usage"]
    assert all(e["id"] == last["id"] for e in tokens)


def test_logprobs_equal_the_dense_log_softmax(server, oracle):
    prompt = "Logprobs please"
    out = generate(server, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    ids = list(prompt.encode()) + out["token_ids"]
    ref = oracle.logprobs(ids)
    n = len(prompt.encode())
    for i, entry in enumerate(out["logprobs"]):
        row = ref[n - 1 + i]
        assert entry["token_id"] == out["token_ids"][i] == int(row.argmax())
        assert math.isclose(entry["logprob"], float(row[entry["token_id"]]), abs_tol=1e-4)
        top = [t["token_id"] for t in entry["top_logprobs"]]
        assert top == row.topk(3).indices.tolist()
    streamed = stream_events(
        server, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, ignore_eos=True
    )
    assert [e["logprob"] for e in streamed[:-2]] == out["logprobs"]


def test_seeded_sampling_is_reproducible(server):
    body = dict(prompt="Sample me", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    assert generate(server, **body)["token_ids"] == generate(server, **body)["token_ids"]


def test_seeded_sampling_equals_a_reference_sampler(server, oracle):  # noqa: F811
    """The served tokens are the draws of a sampler written out here over the dense
    forward: softmax(logits / T), one uniform per token from torch.Generator(seed), the
    first token whose cumulative probability passes it. A server that ignored the
    temperature or decoded greedily would fail (checked: the draws differ from greedy)."""
    import torch

    prompt, n, temperature, seed = "Sample me", 12, 3.0, 1234
    ids = oracle.tokenizer.encode(prompt)
    generator = torch.Generator().manual_seed(seed)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = oracle.model.forward_dense(torch.tensor([ids + expected]))[0, -1].float()
            cdf = (logits / temperature).softmax(-1).cumsum(-1)
            u = torch.rand(1, generator=generator)
            expected.append(int(torch.searchsorted(cdf, u * cdf[-1], right=True)))
    assert expected != oracle.greedy(prompt, n)
    body = dict(prompt=prompt, max_tokens=n, temperature=temperature, seed=seed, ignore_eos=True)
    assert generate(server, **body)["token_ids"] == expected


@pytest.mark.skipif(shutil.which("curl") is None, reason="this machine has no curl binary")
def test_curl_streaming_and_not(server):
    body = json.dumps({"prompt": "Hello", "max_tokens": 8, "temperature": 0})
    plain = subprocess.run(
        ["curl", "-sS", f"{server.url}/v1/generate", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = json.loads(plain.stdout)["text"]
    stream_body = json.dumps({"prompt": "Hello", "max_tokens": 8, "temperature": 0, "stream": True})
    streamed = subprocess.run(
        ["curl", "-sSN", f"{server.url}/v1/generate", "-d", stream_body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    frames = streamed.stdout.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames[:-1])
    events = [json.loads(f[len("data: ") :]) for f in frames[:-2]]
    assert "".join(e["text"] for e in events) == text


def test_a_refused_request_releases_its_admission(server):
    """A request admitted, then refused by validation, leaves nothing in flight: else a
    server would fill its queue with ghosts and answer 429 forever."""
    before = server.state.lifecycle.inflight
    for _ in range(5):
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": ["fine", "x" * 600], "max_tokens": 2},  # the second is too long
            timeout=60,
        )
        assert r.status_code == 400
    assert server.state.lifecycle.inflight == before


def stream_choices(server, route: str, body: dict) -> tuple[dict[int, str], dict[int, str]]:
    """A streamed completion or chat reassembled per choice index: (texts, finish reasons)."""
    chat = route.endswith("chat/completions")
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    with httpx.Client(timeout=60) as client:
        with connect_sse(client, "POST", f"{server.url}{route}", json=body) as src:
            for event in src.iter_sse():
                if event.data == "[DONE]":
                    break
                for choice in event.json()["choices"]:
                    piece = choice["delta"].get("content") if chat else choice["text"]
                    texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
                    if choice["finish_reason"]:
                        finished[choice["index"]] = choice["finish_reason"]
    return texts, finished


def test_every_choice_of_a_multi_choice_stream_finishes(server):
    body = {"prompt": ["one", "two"], "n": 2, "max_tokens": 5, "temperature": 0, "stream": True}
    texts, finished = stream_choices(server, "/v1/completions", body)
    whole = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=60)
    assert sorted(finished) == [0, 1, 2, 3]
    assert [texts[k] for k in range(4)] == [c["text"] for c in whole.json()["choices"]]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_one_or_two_choice_stream_equals_its_whole_answer(server, route, n):
    """One choice takes the front's single-stream path, two its interleaving one: either
    way the chunks carry exactly the choices' indices and add up to the whole answer."""
    chat = route.endswith("chat/completions")
    body = {"n": n, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    texts, finished = stream_choices(server, route, body)
    r = httpx.post(f"{server.url}{route}", json={**body, "stream": False}, timeout=60)
    whole = [c["message"]["content"] if chat else c["text"] for c in r.json()["choices"]]
    assert sorted(texts) == sorted(finished) == list(range(n))
    assert [texts[k] for k in range(n)] == whole and all(whole)
    assert [finished[k] for k in range(n)] == ["length"] * n


def test_a_refused_generate_releases_its_admission(server):
    before = server.state.lifecycle.inflight
    for _ in range(3):
        r = httpx.post(
            f"{server.url}/v1/generate", json={"prompt": "x" * 600, "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 400
    assert server.state.lifecycle.inflight == before
