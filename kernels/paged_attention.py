"""Varlen causal attention over the paged KV cache: the torch twin.

One call serves a mixed batch: sequences prefilling a chunk (causal inside the chunk,
plus everything already cached) and sequences decoding one token. The keys and values of
the new tokens must already be in the cache (write_kv_cache runs first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """One sequence's chunk of q_len new tokens over its whole context."""
    q_len = q.shape[0]
    k = _gather(k_cache, block_table, context_len).float().transpose(0, 1)  # (Hkv, L, D)
    v = _gather(v_cache, block_table, context_len).float().transpose(0, 1)
    q_pos = torch.arange(context_len - q_len, context_len).unsqueeze(1)  # (Q, 1)
    visible = torch.arange(context_len).unsqueeze(0) <= q_pos  # (Q, L)
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k, v, attn_mask=visible, scale=scale, enable_gqa=True
    )  # (H, Q, D); query head h reads K/V head h // (H / Hkv)
    return o.transpose(0, 1).to(q.dtype)


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
    """All single-token decodes at once, gathered token by token, padded and masked."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    batch = len(decodes)
    rows = torch.tensor([starts[s] for s in decodes], dtype=torch.long)
    ctx = torch.tensor([lens[s] for s in decodes], dtype=torch.long)
    pos = torch.arange(int(ctx.max()))
    visible = pos.unsqueeze(0) < ctx.unsqueeze(1)  # (B, L)
    # Padding re-reads the sequence's position 0: written, so finite, and masked out. (Any
    # other slot could hold NaN, and a masked probability of 0 times NaN is still NaN.)
    pos = torch.where(visible, pos, 0)
    tables = block_tables[decodes].long()
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size  # (B, L)
    k = k_cache.view(-1, n_kv, head_dim)[slots].float().transpose(1, 2)  # (B, Hkv, L, D)
    v = v_cache.view(-1, n_kv, head_dim)[slots].float().transpose(1, 2)
    qg = q[rows].float().view(batch, n_kv, n_heads // n_kv, head_dim)  # (B, Hkv, G, D)
    o = F.scaled_dot_product_attention(
        qg, k, v, attn_mask=visible[:, None, None, :], scale=scale
    )  # (B, Hkv, G, D): the G query heads of a K/V head share one gathered K/V
    out[rows] = o.reshape(batch, n_heads, head_dim).to(q.dtype)
