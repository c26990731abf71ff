"""The shipped default model (model/default/): it learned its corpus, scored through our own
forward passes (dense and paged) against a unigram baseline of the same tokenizer.

Everything it needs is committed under model/default/: the corpus (kjv.txt.gz), from which
the held-out split is rebuilt, and heldout.txt, which must be that split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import palm_serve.model
from palm_serve.model import HFTokenizer, PaLM, load_model, load_tokenizer
from training.corpus import read_documents, split_documents
from training.perplexity import (
    dense_nll,
    encode_documents,
    paged_nll,
    token_logprobs,
    unigram_nll,
)

MODEL_DIR = Path(palm_serve.model.__file__).parent / "default"
CONTEXT = 256  # the training context: windows of this many inputs
PAGED_TOKENS = 4 * CONTEXT  # the paged path is slower on a CPU: score a prefix with both


@pytest.fixture(scope="module")
def model() -> PaLM:
    return load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer(model: PaLM) -> HFTokenizer:
    tok = load_tokenizer(MODEL_DIR, model.config.vocab_size)
    assert isinstance(tok, HFTokenizer), "model/default/ must ship its tokenizer.json"
    return tok


@pytest.fixture(scope="module")
def streams(tokenizer: HFTokenizer) -> tuple[list[int], list[int]]:
    """(training split, held-out split) token streams, rebuilt from the committed corpus."""
    train, held = split_documents(read_documents(MODEL_DIR / "kjv.txt.gz"))
    return encode_documents(tokenizer, train), encode_documents(tokenizer, held)


def test_config_tokenizer_and_size(model: PaLM, tokenizer: HFTokenizer) -> None:
    config = model.config
    assert config.eos_token_id is not None
    assert config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.encode("<|endoftext|>") == [config.eos_token_id]
    assert tokenizer.vocab_size == config.vocab_size
    assert config.max_positions >= CONTEXT
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 20 * 2**20


def test_committed_heldout_text_is_the_split() -> None:
    train, held = split_documents(read_documents(MODEL_DIR / "kjv.txt.gz"))
    assert read_documents(MODEL_DIR / "heldout.txt") == held
    assert len(held) >= 20 and not set(held) & set(train)


def test_heldout_perplexity_at_most_half_the_unigram(
    model: PaLM, streams: tuple[list[int], list[int]]
) -> None:
    train_ids, held_ids = streams
    model_nll = dense_nll(model, held_ids, CONTEXT)
    baseline_nll = unigram_nll(train_ids, held_ids, model.config.vocab_size)
    assert math.exp(model_nll) <= 0.5 * math.exp(baseline_nll)
    # The numbers in MODEL_CARD.md come from metrics.json: they must be these.
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    assert model_nll == pytest.approx(metrics["heldout_nll"], rel=1e-4)
    assert baseline_nll == pytest.approx(metrics["unigram_nll"], rel=1e-6)


def test_paged_forward_scores_heldout_like_dense(
    model: PaLM, streams: tuple[list[int], list[int]]
) -> None:
    """The serving path (PaLM.forward over a paged KV cache, several windows per flattened
    batch) gives the held-out loss of the training path, and beats the baseline as well."""
    train_ids, held_ids = streams
    ids = held_ids[: PAGED_TOKENS + 1]
    paged = paged_nll(model, ids, CONTEXT, seqs_per_step=3)
    dense = dense_nll(model, ids, CONTEXT)
    assert abs(paged - dense) <= 1e-5 * dense
    assert math.exp(paged) <= 0.5 * math.exp(unigram_nll(train_ids, ids, model.config.vocab_size))


def test_token_logprobs_agree_with_dense_nll(
    model: PaLM, streams: tuple[list[int], list[int]]
) -> None:
    ids = streams[1][: CONTEXT + 1]
    logprobs = token_logprobs(model, ids)
    assert len(logprobs) == CONTEXT
    assert -sum(logprobs) / CONTEXT == pytest.approx(dense_nll(model, ids, CONTEXT), rel=1e-6)
