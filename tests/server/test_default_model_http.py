"""The shipped default model through a real server: prompt logprobs over HTTP give the
offline held-out loss, and greedy generation equals the no-cache forward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import palm_serve.model
from palm_serve.model import PaLM, load_model, load_tokenizer
from training.corpus import read_documents
from training.perplexity import dense_nll, encode_documents, greedy_dense, windows

from server_helpers import ServerThread, running_server

MODEL_DIR = Path(palm_serve.model.__file__).parent / "default"
CONTEXT = 256
PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(MODEL_DIR) as s:
        yield s


@pytest.fixture(scope="module")
def model() -> PaLM:
    return load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def heldout_ids(model: PaLM) -> list[int]:
    tokenizer = load_tokenizer(MODEL_DIR, model.config.vocab_size)
    return encode_documents(tokenizer, read_documents(MODEL_DIR / "heldout.txt"))


def test_prompt_logprobs_over_http_equal_offline_loss(
    server: ServerThread, model: PaLM, heldout_ids: list[int]
) -> None:
    """Two held-out windows scored with echo + max_tokens=0: the mean negative logprob of
    their predicted tokens is the offline loss of the same windows (1e-3 relative)."""
    chunks = windows(heldout_ids, CONTEXT)[:2]
    body = dict(prompt=chunks, max_tokens=0, echo=True, logprobs=0, temperature=0)
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    scored: list[float] = []
    for choice in sorted(resp.json()["choices"], key=lambda c: c["index"]):
        logprobs = choice["logprobs"]["token_logprobs"]
        assert logprobs[0] is None and len(logprobs) == CONTEXT + 1
        scored.extend(logprobs[1:])
    offline = dense_nll(model, heldout_ids[: 2 * CONTEXT + 1], CONTEXT)
    assert -sum(scored) / len(scored) == pytest.approx(offline, rel=1e-3)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_over_http_equals_the_no_cache_forward(
    server: ServerThread, model: PaLM, prompt: str
) -> None:
    tokenizer = load_tokenizer(MODEL_DIR, model.config.vocab_size)
    body = dict(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True)
    resp = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    expected = greedy_dense(model, tokenizer.encode(prompt), 24)
    assert out["token_ids"] == expected
    assert out["text"] == tokenizer.decode(expected)
