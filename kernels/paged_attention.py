"""Varlen causal attention over the paged KV cache: the torch twin.

One call serves a mixed batch: sequences prefilling a chunk (causal inside the chunk,
plus everything already cached) and sequences decoding one token. The keys and values of
the new tokens must already be in the cache (write_kv_cache runs first)."""

from __future__ import annotations

import torch


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D]; caches [NB, BS, Hkv, D]; block_tables [S, max_blocks] int;
    query_start_loc [S+1] (sequence s owns q rows qsl[s]:qsl[s+1]); context_lens [S]
    (tokens in the cache for s, the new ones included). Query i of a sequence with
    q_len new tokens sits at position context_len - q_len + i and sees keys 0..that.

    Returns out [T, H, D] in q's dtype; the softmax runs in fp32."""
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    q_lens = [starts[s + 1] - starts[s] for s in range(len(lens))]
    decodes = [s for s, n in enumerate(q_lens) if n == 1]
    if decodes:
        _decode_batch(q, k_cache, v_cache, block_tables, starts, lens, decodes, scale, out)
    for s, q_len in enumerate(q_lens):
        if q_len > 1:
            rows = slice(starts[s], starts[s + 1])
            out[rows] = _attend_one(q[rows], k_cache, v_cache, block_tables[s], lens[s], scale)
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:n_blocks].long())  # (nb, BS, Hkv, D)
    return blocks.flatten(0, 1)[:length]


def _attend_one(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
) -> torch.Tensor:
    q_len, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    k = _gather(k_cache, block_table, context_len).float().transpose(0, 1)  # (Hkv, L, D)
    v = _gather(v_cache, block_table, context_len).float().transpose(0, 1)
    qg = q.float().view(q_len, n_kv, group, head_dim).permute(1, 2, 0, 3)  # (Hkv, G, Q, D)
    scores = torch.einsum("hgqd,hld->hgql", qg, k) * scale
    q_pos = torch.arange(context_len - q_len, context_len).unsqueeze(1)  # (Q, 1)
    k_pos = torch.arange(context_len).unsqueeze(0)  # (1, L)
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    o = torch.einsum("hgql,hld->hgqd", probs, v)  # (Hkv, G, Q, D)
    return o.permute(2, 0, 1, 3).reshape(q_len, n_heads, head_dim).to(q.dtype)


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: list[int],
    lens: list[int],
    decodes: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    """All single-token decodes at once, padded to the longest context and masked."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = n_heads // n_kv
    rows = torch.tensor([starts[s] for s in decodes], dtype=torch.long)
    ctx = torch.tensor([lens[s] for s in decodes], dtype=torch.long)
    max_len = int(ctx.max())
    n_blocks = (max_len + block_size - 1) // block_size
    tables = block_tables[decodes, :n_blocks].long()  # (B, nb)
    # Unused table entries may hold anything; clamp so the gather stays in range (masked).
    tables = tables.clamp(0, k_cache.shape[0] - 1)
    k = k_cache[tables].flatten(1, 2)[:, :max_len].float()  # (B, L, Hkv, D)
    v = v_cache[tables].flatten(1, 2)[:, :max_len].float()
    qg = q[rows].float().view(len(decodes), n_kv, group, head_dim)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    pad = torch.arange(max_len).unsqueeze(0) >= ctx.unsqueeze(1)  # (B, L)
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    # Padding rows read other blocks (or stale slots): zero them so 0 * NaN cannot leak in.
    v = v.masked_fill(pad[:, :, None, None], 0.0)
    probs = scores.softmax(dim=-1)
    o = torch.einsum("bhgl,blhd->bhgd", probs, v)
    out[rows] = o.reshape(len(decodes), n_heads, head_dim).to(q.dtype)
