"""The torch twins against plain, obviously-correct loops (the twins are in turn the
oracle for the Triton kernels)."""

from __future__ import annotations

import math
import random

import torch

from palm_serve.kernels import (
    build_cos_sin_cache,
    build_xpos_scale_cache,
    paged_attention,
    rotary_embedding,
    write_kv_cache,
)


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


def test_paged_attention_matches_naive_loops() -> None:
    rng = random.Random(0)
    block_size, heads, n_kv, d = 4, 4, 2, 8
    plan = [(9, 1), (6, 6), (1, 1), (13, 5), (4, 1)]  # (context, new tokens)
    k_cache = torch.full((40, block_size, n_kv, d), float("nan"))
    v_cache = torch.full((40, block_size, n_kv, d), float("nan"))
    pool = list(range(40))
    rng.shuffle(pool)
    tables, contexts, qs = [], [], []
    for ctx, new in plan:
        table = [pool.pop() for _ in range(-(-ctx // block_size))]
        keys, values = torch.randn(ctx, n_kv, d), torch.randn(ctx, n_kv, d)
        for t in range(ctx):
            k_cache[table[t // block_size], t % block_size] = keys[t]
            v_cache[table[t // block_size], t % block_size] = values[t]
        tables.append(table + [0] * (4 - len(table)))
        contexts.append((keys, values))
        qs.append(torch.randn(new, heads, d))
    starts = [0]
    for _, new in plan:
        starts.append(starts[-1] + new)
    out = paged_attention(
        torch.cat(qs),
        k_cache,
        v_cache,
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor([c for c, _ in plan], dtype=torch.int32),
        scale=d**-0.5,
    )
    for s, (keys, values) in enumerate(contexts):
        expected = _naive_attention(qs[s], keys, values, d**-0.5)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], expected, atol=1e-5, rtol=1e-5)
