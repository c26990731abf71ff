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
