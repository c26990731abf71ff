"""Held-out cross-entropy of a PaLM through either forward, and the unigram baseline.

Text is scored as one token stream (each document's tokens, then EOS) cut into windows of
`context` inputs that overlap by one token, so every token but the first is predicted once,
from at most `context` tokens of its own window. All functions return mean nats per
predicted token; perplexity is exp() of that."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from palm_serve.model.attention_metadata import AttentionMetadata
from palm_serve.model.kv_cache import KVCache
from palm_serve.model.palm import PaLM
from palm_serve.model.tokenizer import Tokenizer


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> list[int]:
    """Documents -> one token stream, each document followed by the EOS token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_token_id)
    return ids


def windows(ids: Sequence[int], context: int) -> list[list[int]]:
    """Windows of up to context + 1 tokens, overlapping by one (input, then target)."""
    return [list(ids[i : i + context + 1]) for i in range(0, len(ids) - 1, context)]


def unigram_nll(train_ids: Sequence[int], heldout_ids: Sequence[int], vocab_size: int) -> float:
    """Add-one smoothed token frequencies of the training stream, scored on the same
    held-out tokens the model predicts (all but the first)."""
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[torch.tensor(heldout_ids[1:])].mean())


def perplexity(nll: float) -> float:
    return math.exp(nll)


@torch.no_grad()
def dense_nll(model: PaLM, ids: Sequence[int], context: int, batch_size: int = 8) -> float:
    """Through PaLM.forward_dense (the no-cache path), `batch_size` windows at a time."""
    total, count = 0.0, 0
    chunks = windows(ids, context)
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        for length in sorted({len(w) for w in batch}):  # only the last window is short
            same = torch.tensor([w for w in batch if len(w) == length])
            logits = model.forward_dense(same[:, :-1])  # (B, N, vocab)
            total += float(
                F.cross_entropy(
                    logits.flatten(0, 1).float(), same[:, 1:].flatten(), reduction="sum"
                )
            )
            count += same[:, 1:].numel()
    return total / count


@torch.no_grad()
def paged_nll(
    model: PaLM, ids: Sequence[int], context: int, seqs_per_step: int = 4, block_size: int = 16
) -> float:
    """Through PaLM.forward over a paged KV cache (the serving path): each step prefills
    `seqs_per_step` windows as one flattened batch, every window with its own blocks."""
    blocks_per_seq = -(-context // block_size)
    cache = KVCache.allocate(
        model.config, seqs_per_step * blocks_per_seq, block_size, dtype=model.token_emb.weight.dtype
    )
    total, count = 0.0, 0
    chunks = windows(ids, context)
    for start in range(0, len(chunks), seqs_per_step):
        batch = chunks[start : start + seqs_per_step]
        lens = [len(w) - 1 for w in batch]
        tables = [
            list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(len(batch))
        ]
        meta = AttentionMetadata.build(tables, lens, lens, block_size)
        inputs = torch.tensor([t for w in batch for t in w[:-1]])
        targets = torch.tensor([t for w in batch for t in w[1:]])
        positions = torch.cat([torch.arange(n) for n in lens])
        logits = model.compute_logits(model(inputs, positions, cache, meta))
        total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        count += targets.numel()
    return total / count


# ---- per-token oracles for the serving tests (prompt logprobs, greedy tokens) ---------


@torch.no_grad()
def token_logprobs(model: PaLM, ids: Sequence[int]) -> list[float]:
    """Log-probability of each of ids[1:] given the tokens before it, one no-cache forward
    (len(ids) must fit max_positions). What a server's prompt logprobs should equal."""
    tokens = torch.tensor([list(ids)])
    log_probs = model.forward_dense(tokens[:, :-1])[0].float().log_softmax(-1)
    return log_probs.gather(-1, tokens[0, 1:, None])[:, 0].tolist()


@torch.no_grad()
def greedy_dense(
    model: PaLM, prompt: Sequence[int], max_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step (no cache): the oracle
    for greedy generation through the engine and the server. Stops after EOS."""
    ids = list(prompt)
    for _ in range(max_tokens):
        next_id = int(model.forward_dense(torch.tensor([ids]))[0, -1].argmax())
        ids.append(next_id)
        if next_id == eos_token_id:
            break
    return ids[len(prompt) :]
