"""The paged forward against the dense no-cache forward: incremental decoding through a
shuffled block table, and a mixed prefill + decode batch against each sequence alone."""

from __future__ import annotations

import random

import pytest
import torch

from palm_serve.model import AttentionMetadata, KVCache, PaLM

from conftest import make_config, make_model

TOLERANCE = 1e-4
CONFIGS = {
    "mqa": make_config(),
    "gqa-xpos": make_config(n_kv_heads=2, use_xpos=True, xpos_scale_base=16),
    "plus-one-qknorm": make_config(layernorm_style="gamma_plus_one", qk_rmsnorm=True, heads=2),
}


def _step(
    model: PaLM, cache: KVCache, tables: list[list[int]], chunks: list[list[int]], done: list[int]
) -> torch.Tensor:
    """Run one flattened step: sequence s appends chunks[s] after done[s] cached tokens.
    Returns the logits of every new token, in batch order."""
    ids = [t for chunk in chunks for t in chunk]
    positions = [done[s] + i for s, chunk in enumerate(chunks) for i in range(len(chunk))]
    ctx = [done[s] + len(c) for s, c in enumerate(chunks)]
    meta = AttentionMetadata.build(tables, [len(c) for c in chunks], ctx, cache.block_size)
    hidden = model(torch.tensor(ids), torch.tensor(positions), cache, meta)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("block_size", [1, 4, 16])
@torch.no_grad()
def test_incremental_decoding_matches_dense(name: str, block_size: int) -> None:
    config = CONFIGS[name]
    model = make_model(config)
    n, prompt = 45, 19
    tokens = torch.randint(0, config.vocab_size, (n,))
    expected = model.forward_dense(tokens[None])[0]
    num_blocks = 2 * (-(-n // block_size)) + 3
    table = list(range(num_blocks))
    random.Random(block_size).shuffle(table)  # non-contiguous, out of order
    cache = KVCache.allocate(config, num_blocks, block_size)
    cache.k[0].fill_(float("nan"))  # unused slots must never be read
    logits = [_step(model, cache, [table], [tokens[:prompt].tolist()], [0])]
    for t in range(prompt, n):
        logits.append(_step(model, cache, [table], [[int(tokens[t])]], [t]))
    assert (torch.cat(logits) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_mixed_batch_matches_each_sequence_alone(name: str) -> None:
    """Sequences prefilling a chunk over a cached prefix and others decoding, in one call."""
    config = CONFIGS[name]
    model = make_model(config)
    block_size = 4
    # (cached tokens, new tokens): chunk over a prefix, first chunk, decodes at odd lengths
    plan = [(13, 9), (0, 7), (5, 1), (16, 1), (1, 1), (30, 12)]
    rng = random.Random(0)
    pool = list(range(64))
    rng.shuffle(pool)
    tables, seqs = [], []
    for cached, new in plan:
        need = -(-(cached + new) // block_size)
        tables.append([pool.pop() for _ in range(need)])
        seqs.append(torch.randint(0, config.vocab_size, (cached + new,)).tolist())
    cache = KVCache.allocate(config, 64, block_size)
    # Fill each cached prefix with one prefill of its own, then run the mixed step.
    for s, (cached, _) in enumerate(plan):
        if cached:
            _step(model, cache, [tables[s]], [seqs[s][:cached]], [0])
    chunks = [seqs[s][cached:] for s, (cached, _) in enumerate(plan)]
    mixed = _step(model, cache, tables, chunks, [c for c, _ in plan])
    row = 0
    for s, (cached, new) in enumerate(plan):
        alone = model.forward_dense(torch.tensor([seqs[s]]))[0, cached:]
        assert (mixed[row : row + new] - alone).abs().max() < TOLERANCE, f"sequence {s}"
        row += new


def test_last_token_indices() -> None:
    meta = AttentionMetadata.build([[0], [1, 2], [3]], [3, 1, 2], [3, 5, 2], block_size=4)
    assert meta.last_token_indices().tolist() == [2, 3, 5]
    assert meta.slot_mapping.tolist() == [0, 1, 2, 8, 12, 13]
