"""The torch twins against plain, obviously-correct loops (the twins are in turn the
oracle for the Triton kernels)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from palm_serve.kernels import (
    build_cos_sin_cache,
    build_xpos_scale_cache,
    paged_attention,
    plan_paged_attention,
    rotary_embedding,
    write_kv_cache,
)
from palm_serve.kernels.paged_attention import SPLIT_COST, group_decodes
from palm_serve.kernels.rotary import rotate


def _naive_rotary(x: torch.Tensor, pos: int, base: float, xpos: float | None) -> torch.Tensor:
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        theta = pos / base ** (2 * i / d)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * math.cos(theta) - b * math.sin(theta)
        out[..., i + d // 2] = b * math.cos(theta) + a * math.sin(theta)
        if xpos is not None:
            scale = (2 * i + 0.4 * d) / (1.4 * d)
            out[..., i] *= scale**xpos
            out[..., i + d // 2] *= scale**xpos
    return out


def test_rotary_matches_naive_rotation() -> None:
    t, h, d, max_pos = 7, 3, 8, 64
    q, k = torch.randn(t, h, d), torch.randn(t, 1, d)
    positions = torch.tensor([0, 1, 5, 17, 63, 2, 40])
    cos_sin = build_cos_sin_cache(d, max_pos)
    q2, k2 = q.clone(), k.clone()
    rotary_embedding(q2, k2, positions, cos_sin)
    for row, p in enumerate(positions.tolist()):
        torch.testing.assert_close(q2[row], _naive_rotary(q[row], p, 10000.0, None))
        torch.testing.assert_close(k2[row], _naive_rotary(k[row], p, 10000.0, None))
    # xPos: q scaled by s ** ((p - centre) / base), k by the inverse
    xpos = build_xpos_scale_cache(d, max_pos, scale_base=16)
    q3, k3 = q.clone(), k.clone()
    rotary_embedding(q3, k3, positions, cos_sin, xpos)
    for row, p in enumerate(positions.tolist()):
        power = (p - max_pos // 2) / 16
        torch.testing.assert_close(q3[row], _naive_rotary(q[row], p, 10000.0, power))
        torch.testing.assert_close(k3[row], _naive_rotary(k[row], p, 10000.0, -power))


def test_write_kv_cache_scatters_and_skips_padding() -> None:
    k_cache = torch.zeros(5, 4, 2, 3)
    v_cache = torch.zeros(5, 4, 2, 3)
    k, v = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([7, -1, 0, 19]))
    assert torch.equal(k_cache[1, 3], k[0]) and torch.equal(v_cache[1, 3], v[0])
    assert torch.equal(k_cache[0, 0], k[2]) and torch.equal(k_cache[4, 3], k[3])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3  # the -1 row went nowhere


def _naive_attention(q, keys, values, scale):
    """q [Q, H, D] at the last Q positions of keys/values [L, Hkv, D]."""
    q_len, heads, _ = q.shape
    n_ctx, n_kv = keys.shape[0], keys.shape[1]
    out = torch.zeros_like(q)
    for i in range(q_len):
        pos = n_ctx - q_len + i
        for h in range(heads):
            kh = h // (heads // n_kv)
            scores = torch.stack([q[i, h] @ keys[j, kh] * scale for j in range(pos + 1)])
            out[i, h] = scores.softmax(0) @ values[: pos + 1, kh]
    return out


def _paged_batch(rng: random.Random, seqs, block_size: int, heads: int, n_kv: int, d: int):
    """Caches poisoned with NaN outside the written tokens, shuffled block tables, and per
    sequence (q, keys, values) for (context, new tokens) in seqs."""
    k_cache = torch.full((48, block_size, n_kv, d), float("nan"))
    v_cache = torch.full((48, block_size, n_kv, d), float("nan"))
    pool = list(range(48))
    rng.shuffle(pool)
    tables, per_seq, starts = [], [], [0]
    for ctx, new in seqs:
        table = [pool.pop() for _ in range(-(-ctx // block_size))]
        keys, values = torch.randn(ctx, n_kv, d), torch.randn(ctx, n_kv, d)
        for t in range(ctx):
            k_cache[table[t // block_size], t % block_size] = keys[t]
            v_cache[table[t // block_size], t % block_size] = values[t]
        tables.append(table)
        per_seq.append((torch.randn(new, heads, d), keys, values))
        starts.append(starts[-1] + new)
    width = max(len(t) for t in tables) + 1  # one column of padding past the longest
    args = (
        torch.cat([q for q, _, _ in per_seq]),
        k_cache,
        v_cache,
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor([c for c, _ in seqs], dtype=torch.int32),
    )
    return args, per_seq, starts


BATCHES = {
    "mixed": [(9, 1), (6, 6), (1, 1), (13, 5), (4, 1)],
    "decodes only": [(9, 1), (1, 1), (17, 1), (4, 1)],
    "chunks only": [(6, 6), (13, 5)],
    "decodes of two lengths": [(9, 1), (3, 1), (9, 1), (6, 6), (3, 1), (9, 1)],
    "two-token chunks": [(5, 2), (9, 1), (2, 2), (7, 2)],
}


@pytest.mark.parametrize("split_cost", [SPLIT_COST, 0], ids=["one group", "group per length"])
@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_paged_attention_matches_naive_loops(batch: str, n_kv: int, split_cost: int) -> None:
    block_size, heads, d = 4, 4, 8
    args, per_seq, starts = _paged_batch(
        random.Random(0), BATCHES[batch], block_size, heads, n_kv, d
    )
    plan = plan_paged_attention(*args[3:], block_size, n_kv, split_cost=split_cost)
    lengths = {ctx for ctx, new in BATCHES[batch] if new == 1}
    assert len(plan.decode_groups) == (len(lengths) if split_cost == 0 else bool(lengths))
    out = paged_attention(*args, scale=d**-0.5, plan=plan)
    for s, (q, keys, values) in enumerate(per_seq):
        expected = _naive_attention(q, keys, values, d**-0.5)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("batch", ["mixed", "two-token chunks"])
def test_paged_attention_with_more_kv_heads_than_tokens_per_block(batch, block_size) -> None:
    heads, n_kv, d = 8, 4, 8
    args, per_seq, starts = _paged_batch(
        random.Random(1), BATCHES[batch], block_size, heads, n_kv, d
    )
    out = paged_attention(*args, scale=d**-0.5)
    for s, (q, keys, values) in enumerate(per_seq):
        expected = _naive_attention(q, keys, values, d**-0.5)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], expected, atol=1e-5, rtol=1e-5)


def test_one_plan_serves_every_layer() -> None:
    """A model plans once per step and reuses the plan (and its gather buffers) for every
    layer's cache: each layer's result must equal planning afresh."""
    rng = random.Random(1)
    block_size, heads, n_kv, d = 4, 4, 2, 8
    seqs = BATCHES["mixed"]
    q, k0, v0, tables, starts, lens = _paged_batch(rng, seqs, block_size, heads, n_kv, d)[0]
    _, k1, v1, _, _, _ = _paged_batch(random.Random(1), seqs, block_size, heads, n_kv, d)[0]
    k1, v1 = k1 * 2 - 1, v1 * 3  # a second layer: same tables, different contents
    plan = plan_paged_attention(tables, starts, lens, block_size, n_kv)
    for k_cache, v_cache in ((k0, v0), (k1, v1), (k0, v0)):
        planned = paged_attention(q, k_cache, v_cache, tables, starts, lens, 0.3, plan=plan)
        fresh = paged_attention(q, k_cache, v_cache, tables, starts, lens, 0.3)
        assert torch.equal(planned, fresh)
        assert not planned.isnan().any()


def test_group_decodes_cuts_padding_where_it_pays() -> None:
    lens = list(range(768, 31, -23))  # 33 decodes, uniform lengths
    random.Random(0).shuffle(lens)
    groups = group_decodes(lens, split_cost=512, max_groups=4)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    spans = [(max(lens[i] for i in g), min(lens[i] for i in g)) for g in groups]
    assert all(
        low >= spans[n + 1][0] for n, (_, low) in enumerate(spans[:-1])
    )  # disjoint, longest first
    padded = sum(len(g) * top for g, (top, _) in zip(groups, spans, strict=True))
    assert len(groups) == 4 and padded < 0.7 * len(lens) * 768
    assert group_decodes(lens, split_cost=10**9) == [
        sorted(range(len(lens)), key=lambda i: -lens[i])
    ]
    assert group_decodes([700, 40, 40, 40], split_cost=512) == [[0], [1, 2, 3]]  # an outlier
    assert group_decodes([700, 40, 40, 40], split_cost=2048) == [[0, 1, 2, 3]]  # not worth it
    assert group_decodes([40, 40, 40], split_cost=0) == [[0, 1, 2]]
    assert group_decodes([]) == []


def test_paged_attention_honours_the_scale_and_a_batch_ending_in_a_chunk() -> None:
    """A scale that is not 1/sqrt(head_dim) (the default a twin could silently fall back
    to), and decodes first then a chunk: the decodes are not every row."""
    block_size, heads, n_kv, d = 4, 4, 2, 8
    seqs = [(9, 1), (3, 1), (6, 3)]
    args, per_seq, starts = _paged_batch(random.Random(2), seqs, block_size, heads, n_kv, d)
    out = paged_attention(*args, scale=0.3)
    for s, (q, keys, values) in enumerate(per_seq):
        expected = _naive_attention(q, keys, values, 0.3)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], expected, atol=1e-5, rtol=1e-5)


def test_the_twins_keep_a_bf16_model_in_bf16() -> None:
    """bf16 in, bf16 out (each twin computes in fp32 inside); one plan serves a layer of
    fp32 caches and then one of bf16 caches, as it would a model of either."""
    block_size, heads, n_kv, d = 4, 4, 2, 8
    batch = _paged_batch(random.Random(3), BATCHES["mixed"], block_size, heads, n_kv, d)
    q, k_cache, v_cache, tables, qsl, lens = batch[0]
    plan = plan_paged_attention(tables, qsl, lens, block_size, n_kv)
    exact = paged_attention(q, k_cache, v_cache, tables, qsl, lens, 0.3, plan=plan)
    half = paged_attention(
        q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables, qsl, lens, 0.3, plan=plan
    )
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), exact, atol=0.05, rtol=0.05)

    cos_sin = build_cos_sin_cache(d, 64, dtype=torch.bfloat16)
    assert cos_sin.dtype == torch.bfloat16
    qr, kr = torch.randn(5, heads, d), torch.randn(5, n_kv, d)
    q16, k16 = qr.bfloat16(), kr.bfloat16()
    rotary_embedding(q16, k16, torch.arange(5), cos_sin)
    rotary_embedding(qr, kr, torch.arange(5), build_cos_sin_cache(d, 64))
    torch.testing.assert_close(q16.float(), qr, atol=0.05, rtol=0.05)
    cos, sin = cos_sin[:5, : d // 2], cos_sin[:5, d // 2 :]
    assert rotate(torch.randn(5, d).bfloat16(), cos, sin).dtype == torch.bfloat16

    k_cache16 = torch.zeros(2, 4, n_kv, d, dtype=torch.bfloat16)
    v_cache16 = torch.zeros_like(k_cache16)
    k, v = torch.randn(3, n_kv, d), torch.randn(3, n_kv, d)
    write_kv_cache(k, v, k_cache16, v_cache16, torch.tensor([0, 5, 7]))
    assert torch.equal(k_cache16[1, 1], k[1].bfloat16()) and torch.equal(
        v_cache16[1, 3], v[2].bfloat16()
    )


def test_the_xpos_factor_is_one_at_its_centre() -> None:
    """q . k carries scale ** ((i - j) / base): the factor is 1 at the centre, which is half
    the maximum length (rounded down) unless given."""
    assert torch.equal(build_xpos_scale_cache(8, 63, 16.0)[31], torch.ones(4))
    assert torch.equal(build_xpos_scale_cache(8, 64, 16.0, center=5)[5], torch.ones(4))
    assert not torch.equal(build_xpos_scale_cache(8, 64, 16.0, center=5)[32], torch.ones(4))


def test_group_decodes_makes_at_most_max_groups() -> None:
    assert group_decodes([100, 50, 10], split_cost=0, max_groups=2) == [[0], [1, 2]]
