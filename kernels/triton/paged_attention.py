"""Varlen causal attention over the paged KV cache for a mixed batch (prefill chunks and
single-token decodes in one launch): the Triton twin of kernels/paged_attention.py.

FlashAttention-style online softmax (Dao et al., arXiv:2205.14135) with fp32 statistics
and accumulator. Multi-query aware: a tile's BLOCK_M rows are BLOCK_Q query tokens x the
GROUP query heads that share one K/V head, so each K/V block is loaded once for all of
them and tl.dot gets M >= 16 even for a single decode token (rows past BLOCK_Q * GROUP or
past the sequence's new tokens are masked). Keys are gathered through the block table
token by token, so BLOCK_N does not depend on the cache's block_size.

Flash-decoding (split-K): when the query tiles alone cannot fill the GPU (a few long
decodes), grid axis 2 splits each tile's key range into NUM_SPLITS contiguous parts;
each writes an unnormalised fp32 partial and its (max, sum) statistics, and a second
kernel merges the parts in split order, so the result is deterministic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..paged_attention import check_cache_dtypes
from .launch import COMPILE_OPTIONS, check_same_device, for_device, is_interpreted
from .split_policy import choose_num_splits, num_sms

BLOCK_N = 64  # keys per inner step (fp16 / bf16)
LOG2_E = 1.4426950408889634


@triton.jit
def _sequence_of_tile(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """Sequence s owns the query tiles from qsl[s] // BLOCK_Q + s on (a numbering with gaps
    that needs no host-side tile map, so no sync): the last s whose first tile is <= tile."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [NB, BS, Hkv, D]
    v_cache_ptr,  # [NB, BS, Hkv, D], same strides as k_cache
    out_ptr,  # [T, H, D] when NUM_SPLITS == 1, else the fp32 partials [NUM_SPLITS, T, H, D]
    ml_ptr,  # fp32 [2, NUM_SPLITS, T, H]: each split's row max (log2 units) and row sum
    block_tables_ptr,  # [S, max_blocks] int32
    query_start_loc_ptr,  # [S + 1] int32
    context_lens_ptr,  # [S] int32, new tokens included
    scale_log2,  # softmax scale * log2(e): exp2 replaces exp
    num_seqs,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_os,  # split stride of out (0 when NUM_SPLITS == 1)
    stride_ot,
    stride_oh,
    stride_bt,
    num_heads,
    stride_ms,  # split stride of ml: T * H
    stride_ml,  # max -> sum stride of ml: NUM_SPLITS * T * H
    block_size,
    GROUP: tl.constexpr,  # query heads per K/V head
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows per tile (power of two >= 16)
    BLOCK_Q: tl.constexpr,  # query tokens per tile = BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: numpy cannot matmul bf16 (stored as uint16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent tf32), else ignored
    WIDEN_CACHE: tl.constexpr,  # an fp32 q over a 16-bit cache: K, V and P in fp32
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _sequence_of_tile(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_tok = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q  # first new token of this tile
    if tile_tok >= q_len:
        return  # a gap in the tile numbering

    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len  # tokens cached before this step
    rows = tl.arange(0, BLOCK_M)
    tok = tile_tok + rows // GROUP  # (BLOCK_M,) new-token index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = prefix_len + tok  # each row's position: it sees keys 0..q_pos
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_row = (q_start + tok).to(tl.int64)
    q_off = q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys the tile's last row can see, cut into BLOCK_N steps shared out among the splits.
    kv_len = tl.minimum(context_len, prefix_len + tile_tok + BLOCK_Q)
    n_steps = tl.cdiv(kv_len, BLOCK_N)
    per_split = tl.cdiv(n_steps, NUM_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, n_steps)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for step in range(first, last):
        n = step * BLOCK_N + tl.arange(0, BLOCK_N)  # (N,) key positions
        n_ok = n < kv_len
        block = tl.load(table + n // block_size, mask=n_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (n % block_size) * stride_cs + kv_head * stride_ch
        k = tl.load(
            k_cache_ptr + kv_off[None, :] + d[:, None],
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (D, N)
        v = tl.load(
            v_cache_ptr + kv_off[:, None] + d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (N, D)
        if DOT_FP32 or WIDEN_CACHE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # (M, N) fp32
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WIDEN_CACHE:
            p_in = p  # as over an fp32 cache
        else:
            # P at the cache's precision, as the MMA sees it
            p_in = p.to(v_cache_ptr.dtype.element_ty)
            if DOT_FP32:
                p_in = p_in.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_row = q_row[:, None] * stride_ot + head[:, None] * stride_oh
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        # Every live row sees key 0, so l_i > 0.
        out = acc / l_i[:, None]
        tl.store(out_ptr + out_row + d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials of an empty split are written too (m = -inf, l = 0, acc = 0): the merge
        # reads every split of every row.
        tl.store(out_ptr + split * stride_os + out_row + d[None, :], acc, mask=out_mask)
        ml_off = split * stride_ms + q_row * num_heads + head
        tl.store(ml_ptr + ml_off, m_i, mask=row_ok)
        tl.store(ml_ptr + stride_ml + ml_off, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,  # fp32 [NUM_SPLITS, T, H, D], unnormalised
    ml_ptr,  # fp32 [2, NUM_SPLITS, T, H]
    out_ptr,  # [T, H, D]
    num_rows,  # T * H
    num_heads,
    stride_ml,  # max -> sum stride of ml: NUM_SPLITS * T * H
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,  # (token, head) rows per program
    NUM_SPLITS: tl.constexpr,
):
    # Rows are (token, head) pairs; the splits are combined in index order, always.
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    d = tl.arange(0, D_PAD)
    row_ok = row < num_rows
    mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    m_max = tl.load(ml_ptr + row, mask=row_ok, other=0.0)  # split 0 holds key 0: finite
    for sp in range(1, NUM_SPLITS):
        m_max = tl.maximum(m_max, tl.load(ml_ptr + sp * num_rows + row, mask=row_ok, other=0.0))
    num = tl.zeros([BLOCK_R, D_PAD], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for sp in range(NUM_SPLITS):
        m_s = tl.load(ml_ptr + sp * num_rows + row, mask=row_ok, other=0.0)
        w = tl.math.exp2(m_s - m_max)  # 0 for an empty split (m_s = -inf)
        den += w * tl.load(ml_ptr + stride_ml + sp * num_rows + row, mask=row_ok, other=1.0)
        src = partial_ptr + (sp * num_rows + row)[:, None] * HEAD_DIM + d[None, :]
        num += w[:, None] * tl.load(src, mask=mask, other=0.0)
    out = num / den[:, None]
    t = row // num_heads
    dst = out_ptr + t[:, None] * stride_ot + (row - t * num_heads)[:, None] * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


# One place for the launch options, so the AOT compile test builds what runs.
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 2, **COMPILE_OPTIONS}
# fp32 keeps exact fp32 dots (FMA, no tensor cores: a GPU serves fp16 / bf16), which spill
# at 64 keys x 4 warps; 32 keys x 8 warps do not (182 registers on sm_80).
FP32_BLOCK_N = 32
FP32_LAUNCH_OPTIONS = {"num_warps": 8, "num_stages": 2, **COMPILE_OPTIONS}
MERGE_OPTIONS = {"num_warps": 4, "num_stages": 1, **COMPILE_OPTIONS}
MERGE_TILE = 4096  # fp32 elements of output a merge program combines (32 rows at D=128)


def tile_shape(num_tokens: int, num_seqs: int, group: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): 16 rows when every sequence decodes one token (T == S), else
    64 rows so a prefill chunk reloads K/V less often; never fewer rows than GROUP."""
    rows = 16 if num_tokens == num_seqs else 64
    block_m = max(rows, triton.next_power_of_2(group))
    return block_m, block_m // group


@dataclass(frozen=True)
class LaunchPlan:
    grid: tuple[int, int, int]  # (query tiles incl. gaps, K/V heads, splits)
    constexprs: dict
    options: dict  # num_warps, num_stages, ...

    @property
    def num_splits(self) -> int:
        return self.grid[2]


def plan_launch(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                num_seqs: int, num_splits: int | None = None) -> LaunchPlan:  # fmt: skip
    """Tiles, splits and options from shapes alone (no device sync)."""
    num_tokens, num_heads, head_dim = q.shape
    n_kv, group = k_cache.shape[2], num_heads // k_cache.shape[2]
    block_m, block_q = tile_shape(num_tokens, num_seqs, group)
    grid_tiles = num_tokens // block_q + num_seqs
    fp32 = q.dtype == torch.float32
    block_n = FP32_BLOCK_N if fp32 else BLOCK_N
    if num_splits is None:
        max_steps = triton.cdiv(block_tables.shape[1] * k_cache.shape[1], block_n)
        live_tiles = min(num_tokens, grid_tiles)
        num_splits = choose_num_splits(live_tiles, n_kv, max_steps, block_n, num_sms(q.device))
    constexprs = dict(
        GROUP=group,
        HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        # numpy has no bf16 matmul: the interpreter upcasts the operands, which is exact
        # (bf16 x bf16 products fit fp32; the tensor cores also accumulate in fp32).
        DOT_FP32=q.dtype == torch.bfloat16 and is_interpreted(_paged_attention_kernel),
        DOT_PRECISION="ieee" if fp32 else "tf32",  # tf32 is ignored for fp16 / bf16
        WIDEN_CACHE=fp32 and k_cache.dtype != torch.float32,
    )
    options = FP32_LAUNCH_OPTIONS if fp32 else LAUNCH_OPTIONS
    return LaunchPlan((grid_tiles, n_kv, num_splits), constexprs, options)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    plan: None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [T, H, D]; caches [NB, BS, Hkv, D]; block_tables [S, max_blocks] int32;
    query_start_loc [S+1] int32; context_lens [S] int32 (new tokens included). Query i of a
    sequence with q_len new tokens sits at position context_len - q_len + i.

    Returns out [T, H, D] in q's dtype. plan: the backend's per-step plan, always None here
    (the twin's signature). num_splits overrides the split-K policy (tests, benchmarks)."""
    _check(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    launch = plan_launch(q, k_cache, block_tables, num_seqs, num_splits)
    split = launch.num_splits > 1
    target, ml = out, out  # without splits the kernel writes out and never touches ml
    if split:  # fp32 partials [splits, T, H, D] and their (max, sum) [2, splits, T, H]
        target = q.new_empty((launch.num_splits, *q.shape), dtype=torch.float32)
        ml = q.new_empty((2, launch.num_splits, num_tokens, num_heads), dtype=torch.float32)
    for_device(_paged_attention_kernel, q.device)[launch.grid](
        q, k_cache, v_cache, target, ml, block_tables, query_start_loc, context_lens,
        scale * LOG2_E, num_seqs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        target.stride(0) if split else 0, target.stride(-3), target.stride(-2),
        block_tables.stride(0),
        num_heads, num_tokens * num_heads, ml.stride(0) if split else 0,
        k_cache.shape[1],
        **launch.constexprs,
        **launch.options,
    )  # fmt: skip
    if split:
        _merge(target, ml, out, launch.num_splits)
    return out


def _merge(partial: torch.Tensor, ml: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    num_tokens, num_heads, head_dim = out.shape
    d_pad = triton.next_power_of_2(head_dim)
    block_r = max(1, MERGE_TILE // d_pad)
    merge = for_device(_merge_splits_kernel, out.device)
    merge[(triton.cdiv(num_tokens * num_heads, block_r),)](
        partial, ml, out, num_tokens * num_heads, num_heads,
        ml.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_R=block_r,
        NUM_SPLITS=num_splits,
        **MERGE_OPTIONS,
    )  # fmt: skip


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"q [T, H, D] and caches [NB, BS, Hkv, D]: got {q.shape}, {k_cache.shape}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    check_cache_dtypes(q, k_cache, v_cache)
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k_cache.shape[2]} K/V heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last dimension")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("context_lens", context_lens)):  # fmt: skip
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 with a contiguous last dimension")
    if query_start_loc.shape[0] != context_lens.shape[0] + 1:
        raise ValueError("query_start_loc must have one more entry than context_lens")
    check_same_device("q", q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                      query_start_loc=query_start_loc, context_lens=context_lens)  # fmt: skip
