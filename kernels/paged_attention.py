"""Varlen causal attention over the paged KV cache: the torch twin.

One call serves a mixed batch: sequences prefilling a chunk (causal inside the chunk,
plus everything already cached) and sequences decoding one token. The keys and values of
the new tokens must already be in the cache (write_kv_cache runs first).

The host-side bookkeeping (which rows decode, which cache slots each decode reads) is the
same for every layer of a step, so a model builds it once per step with
plan_paged_attention and passes it to every layer's call; without a plan, a call builds
its own. The plan also groups the decodes by context length (group_decodes), as each group
is padded to its longest context."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Decodes are padded to their group's longest context, so mixing short and long contexts in
# one group wastes work; each extra group costs six more ops per layer. Two or three groups
# won with spinning and with sleeping OpenMP workers alike (bench/decode_groups.py; the
# figures are in docs/BENCHMARKS.md).
SPLIT_COST = 2048
MAX_DECODE_GROUPS = 4
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_cache_dtypes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The dtypes every sibling of the twin reads: caches of q's dtype, or under an fp32 q
    a 16-bit cache (the server's --kv-cache-dtype). The softmax and sums run in fp32."""
    if q.dtype not in CACHE_DTYPES or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q and the caches must each be one of {CACHE_DTYPES}, the caches alike")
    if k_cache.dtype != q.dtype and q.dtype != torch.float32:
        raise ValueError(
            f"the caches must have q's dtype ({q.dtype}), or be 16-bit under an fp32 q: "
            f"got {k_cache.dtype}"
        )


@dataclass
class DecodeGroup:
    """Single-token decodes of similar context length, attended at once over a padded key
    length L (the group's longest context)."""

    rows: torch.Tensor | None  # [B] their q rows; None when they are every row, in order
    index: torch.Tensor  # [B * Hkv * L] row of the [slots * Hkv, D] cache view to read
    bias: torch.Tensor  # [B * Hkv, 1, L] fp32: 0 where visible, -inf on padding
    # The gathered keys and values, allocated by the first layer and reused by the others
    # (fewer large allocations per step: glibc returns them to the OS and faults them in).
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def gather(self, name: str, cache: torch.Tensor) -> torch.Tensor:
        """The group's rows of one layer's cache: [B * Hkv, L, D] (padding included)."""
        head_dim = cache.shape[-1]
        rows = cache.view(-1, head_dim)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != cache.dtype or buffer.device != cache.device:
            buffer = torch.empty(
                (self.index.numel(), head_dim), dtype=cache.dtype, device=cache.device
            )
            self.buffers[name] = buffer
        torch.index_select(rows, 0, self.index, out=buffer)
        return buffer.view(-1, self.bias.shape[-1], head_dim)


@dataclass
class PagedAttentionPlan:
    """One step's bookkeeping for the torch twin (see plan_paged_attention)."""

    starts: list[int]  # query_start_loc
    context_lens: list[int]
    chunks: list[int]  # sequences with more than one new token
    decode_groups: list[DecodeGroup]
    num_kv_heads: int


def group_decodes(
    lens: list[int], split_cost: int = SPLIT_COST, max_groups: int = MAX_DECODE_GROUPS
) -> list[list[int]]:
    """Positions of `lens` (the decodes' context lengths) in groups of similar length, longest
    first. Starting from one group, each round makes the one cut (anywhere, in any group) that
    saves the most padded key positions, while that saving exceeds split_cost."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    cuts = [0, len(order)]  # group g is order[cuts[g] : cuts[g + 1]]
    while len(cuts) - 1 < max_groups:
        best_saving, best_cut = split_cost, None
        for start, end in itertools.pairwise(cuts):
            if end - start < 2:
                continue
            longest = lens[order[start]]
            for cut in range(start + 1, end):
                saving = (end - cut) * (longest - lens[order[cut]])
                if saving > best_saving:
                    best_saving, best_cut = saving, cut
        if best_cut is None:
            break
        bisect.insort(cuts, best_cut)
    return [order[start:end] for start, end in itertools.pairwise(cuts) if end > start]


def plan_paged_attention(
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    num_kv_heads: int,
    split_cost: int = SPLIT_COST,
) -> PagedAttentionPlan:
    """The layer-independent part of paged_attention for one step (same arguments);
    split_cost: see group_decodes."""
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    q_lens = [starts[s + 1] - starts[s] for s in range(len(lens))]
    decodes = [s for s, n in enumerate(q_lens) if n == 1]
    chunks = [s for s, n in enumerate(q_lens) if n > 1]
    groups = []
    for members in group_decodes([lens[s] for s in decodes], split_cost):
        seqs = sorted(decodes[i] for i in members)
        every_row = len(seqs) == starts[-1]  # one group of every row, in order
        rows = None if every_row else torch.tensor([starts[s] for s in seqs])
        groups.append(_plan_group(seqs, rows, lens, block_tables, block_size, num_kv_heads))
    return PagedAttentionPlan(starts, lens, chunks, groups, num_kv_heads)


def _plan_group(
    seqs: list[int],
    rows: torch.Tensor | None,
    lens: list[int],
    block_tables: torch.Tensor,
    block_size: int,
    num_kv_heads: int,
) -> DecodeGroup:
    ctx = torch.tensor([lens[s] for s in seqs], dtype=torch.long)
    pos = torch.arange(max(lens[s] for s in seqs))
    visible = pos.unsqueeze(0) < ctx.unsqueeze(1)  # (B, L)
    # Padding re-reads the sequence's position 0: written, so finite, and weighted by an
    # exact 0. (Any other slot could hold NaN, and 0 times NaN is still NaN.)
    pos = torch.where(visible, pos, 0)
    tables = block_tables[seqs].long()
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size  # (B, L)
    # Each K/V head's rows of a slot, laid out (B, Hkv, L) so the gather is ready for bmm.
    heads = torch.arange(num_kv_heads).view(1, -1, 1)
    index = (slots.unsqueeze(1) * num_kv_heads + heads).flatten()
    bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    bias = bias.repeat_interleave(num_kv_heads, dim=0).unsqueeze(1)  # (B * Hkv, 1, L)
    return DecodeGroup(rows, index, bias)


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
    for group in plan.decode_groups:
        _decode_group(q, k_cache, v_cache, group, plan.num_kv_heads, scale, out)
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


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    n_kv: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """One group of single-token decodes at once: one gather of their keys and values,
    padded to the group's longest context and masked, then two batched matmuls per
    (sequence, K/V head). The G query heads of a K/V head share its gathered keys (GQA/MQA)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    k, v = group.gather("k", k_cache), group.gather("v", v_cache)
    rows = group.rows
    qd = q if rows is None else q.index_select(0, rows)
    qg = qd.float().reshape(-1, n_heads // n_kv, head_dim)  # (B * Hkv, G, D)
    scores = torch.baddbmm(group.bias, qg, k.float().transpose(1, 2), alpha=scale)
    o = torch.bmm(scores.softmax(-1), v.float()).view(-1, n_heads, head_dim).to(q.dtype)
    if rows is None:
        out.copy_(o)
    else:
        out.index_copy_(0, rows, o)
