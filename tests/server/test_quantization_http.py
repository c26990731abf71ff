"""`--quantization int8` through a real server (engine core in its own process, the compiled
CPU kernels): the default model's held-out perplexity, scored by the server (echo +
logprobs on /v1/completions), stays within 1% of the fp32 model's; /metrics reports the
weight bytes the core holds, which are those of the int8 model; combinations the int8
path does not serve are refused at settings time, naming the setting."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

import palm_serve.model
from palm_serve.engine.factory import load_served_model
from palm_serve.model import load_model, load_tokenizer
from palm_serve.model.quantization import weight_bytes
from palm_serve.server.settings import Settings
from training.corpus import read_documents
from training.perplexity import dense_nll, encode_documents, windows

from server_helpers import ServerThread, metric, parse_metrics, running_server

MODEL_DIR = Path(palm_serve.model.__file__).parent / "default"
CONTEXT = 256
WINDOWS = 6  # 1536 held-out tokens: the whole held-out split is in docs/BENCHMARKS.md
MAX_PERPLEXITY_RATIO = 1.01


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(MODEL_DIR, quantization="int8", kernel_backend="cpu", compile=False) as s:
        yield s


@pytest.fixture(scope="module")
def heldout_ids() -> list[int]:
    tokenizer = load_tokenizer(MODEL_DIR, load_model(MODEL_DIR).config.vocab_size)
    return encode_documents(tokenizer, read_documents(MODEL_DIR / "heldout.txt"))


def served_nll(server: ServerThread, chunks: list[list[int]]) -> float:
    body = dict(prompt=chunks, max_tokens=0, echo=True, logprobs=0, temperature=0)
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    scored = [lp for c in resp.json()["choices"] for lp in c["logprobs"]["token_logprobs"][1:]]
    assert len(scored) == sum(len(c) - 1 for c in chunks)
    return -sum(scored) / len(scored)


def test_heldout_perplexity_within_one_percent_of_fp32(
    server: ServerThread, heldout_ids: list[int]
) -> None:
    chunks = windows(heldout_ids, CONTEXT)[:WINDOWS]
    int8_nll = served_nll(server, chunks)
    fp32_nll = dense_nll(load_model(MODEL_DIR), heldout_ids[: WINDOWS * CONTEXT + 1], CONTEXT)
    ratio = math.exp(int8_nll - fp32_nll)
    print(f"perplexity fp32 {math.exp(fp32_nll):.4f}, int8 (served) {math.exp(int8_nll):.4f}")
    assert 1 / MAX_PERPLEXITY_RATIO <= ratio <= MAX_PERPLEXITY_RATIO


def test_metrics_report_the_int8_weight_bytes(server: ServerThread) -> None:
    """The gauge is what the core holds: the int8 linears, the fp32 embedding, and the
    oneDNN-packed copy of the tied head (4 MiB each, unquantized): 1.9x less than fp32."""
    samples = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    reported = metric(samples, "palm_model_weight_bytes")
    as_served = dict(kernel_backend="cpu", prepack_cpu_linears=True)
    int8 = weight_bytes(load_served_model(MODEL_DIR, quantization="int8", **as_served))
    fp32 = weight_bytes(load_served_model(MODEL_DIR, **as_served))
    assert reported == int8
    assert fp32 / int8 >= 1.8


def test_greedy_generation_serves(server: ServerThread) -> None:
    body = dict(prompt="In the beginning", max_tokens=12, temperature=0, ignore_eos=True)
    resp = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["token_ids"]) == 12


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(device="cpu", dtype="bfloat16"), "dtype bfloat16 is not supported"),
        (dict(tensor_parallel_size=2), "does not shard"),
    ],
)
def test_unsupported_combinations_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as error:
        Settings(quantization="int8", **overrides)
    assert "quantization" in str(error.value)
