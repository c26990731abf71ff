"""Varlen causal attention over the paged KV cache: the torch twin.

One call serves a mixed batch: sequences prefilling a chunk (causal inside the chunk,
plus everything already cached) and sequences decoding one token. The keys and values of
the new tokens must already be in the cache (write_kv_cache runs first).

The host-side bookkeeping (which rows decode, which cache slots each decode reads) is the
same for every layer of a step, so a model builds it once per step with
plan_paged_attention and passes it to every layer's call; without a plan, a call builds
its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PagedAttentionPlan:
    """One step's bookkeeping for the torch twin (see plan_paged_attention)."""

    starts: list[int]  # query_start_loc
    context_lens: list[int]
    chunks: list[int]  # sequences with more than one new token
    # The single-token decodes, attended all at once over a padded key length L:
    decode_rows: torch.Tensor | None  # [B] their q rows; None when every row decodes
    decode_index: torch.Tensor  # [B * Hkv * L] row of the [slots * Hkv, D] cache view to read
    decode_bias: torch.Tensor  # [B * Hkv, 1, L] fp32: 0 where visible, -inf on padding
    num_kv_heads: int
    # The gathered keys and values, allocated by the first layer and reused by the others
    # (fewer large allocations per step: glibc returns them to the OS and faults them in).
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def gather(self, name: str, cache: torch.Tensor) -> torch.Tensor:
        """The decodes' rows of one layer's cache: [B * Hkv, L, D] (padding included)."""
        head_dim = cache.shape[-1]
        rows = cache.view(-1, head_dim)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != cache.dtype or buffer.device != cache.device:
            buffer = torch.empty(
                (self.decode_index.numel(), head_dim), dtype=cache.dtype, device=cache.device
            )
            self.buffers[name] = buffer
        torch.index_select(rows, 0, self.decode_index, out=buffer)
        return buffer.view(-1, self.decode_bias.shape[-1], head_dim)


def plan_paged_attention(
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    num_kv_heads: int,
) -> PagedAttentionPlan:
    """The layer-independent part of paged_attention for one step (same arguments)."""
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    q_lens = [starts[s + 1] - starts[s] for s in range(len(lens))]
    decodes = [s for s, n in enumerate(q_lens) if n == 1]
    chunks = [s for s, n in enumerate(q_lens) if n > 1]
    rows = None if len(decodes) == starts[-1] else torch.tensor([starts[s] for s in decodes])
    ctx = torch.tensor([lens[s] for s in decodes], dtype=torch.long)
    pos = torch.arange(max((lens[s] for s in decodes), default=0))
    visible = pos.unsqueeze(0) < ctx.unsqueeze(1)  # (B, L)
    # Padding re-reads the sequence's position 0: written, so finite, and weighted by an
    # exact 0. (Any other slot could hold NaN, and 0 times NaN is still NaN.)
    pos = torch.where(visible, pos, 0)
    tables = block_tables[decodes].long()
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size  # (B, L)
    # Each K/V head's rows of a slot, laid out (B, Hkv, L) so the gather is ready for bmm.
    heads = torch.arange(num_kv_heads).view(1, -1, 1)
    index = (slots.unsqueeze(1) * num_kv_heads + heads).flatten()
    bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    bias = bias.repeat_interleave(num_kv_heads, dim=0).unsqueeze(1)  # (B * Hkv, 1, L)
    return PagedAttentionPlan(starts, lens, chunks, rows, index, bias, num_kv_heads)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    plan: PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """q [T, H, D]; caches [NB, BS, Hkv, D]; block_tables [S, max_blocks] int;
    query_start_loc [S+1] (sequence s owns q rows qsl[s]:qsl[s+1]); context_lens [S]
    (tokens in the cache for s, the new ones included). Query i of a sequence with
    q_len new tokens sits at position context_len - q_len + i and sees keys 0..that.
    plan: this step's plan_paged_attention of the same tables, or None to build it here.

    Returns out [T, H, D] in q's dtype; the softmax runs in fp32."""
    if out is None:
        out = torch.empty_like(q)
    if plan is None:
        plan = plan_paged_attention(
            block_tables, query_start_loc, context_lens, k_cache.shape[1], k_cache.shape[2]
        )
    if plan.decode_index.numel():
        _decode_batch(q, k_cache, v_cache, plan, scale, out)
    for s in plan.chunks:
        rows = slice(plan.starts[s], plan.starts[s + 1])
        out[rows] = _attend_one(
            q[rows], k_cache, v_cache, block_tables[s], plan.context_lens[s], scale
        )
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
    plan: PagedAttentionPlan,
    scale: float,
    out: torch.Tensor,
) -> None:
    """All single-token decodes at once: one gather of their keys and values, padded to
    the longest context and masked, then two batched matmuls per (sequence, K/V head).
    The G query heads of a K/V head share its gathered keys (GQA/MQA)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv = plan.num_kv_heads
    k, v = plan.gather("k", k_cache), plan.gather("v", v_cache)
    rows = plan.decode_rows
    qd = q if rows is None else q.index_select(0, rows)
    qg = qd.float().reshape(-1, n_heads // n_kv, head_dim)  # (B * Hkv, G, D)
    scores = torch.baddbmm(plan.decode_bias, qg, k.float().transpose(1, 2), alpha=scale)
    o = torch.bmm(scores.softmax(-1), v.float()).view(-1, n_heads, head_dim).to(q.dtype)
    if rows is None:
        out.copy_(o)
    else:
        out.index_copy_(0, rows, o)
