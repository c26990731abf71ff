"""The compiled paged attention (paged_attention.cpp) behind the torch twin's signature."""

from __future__ import annotations

import torch

from ..paged_attention import check_cache_dtypes


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
) -> torch.Tensor:
    """q [T, H, D] (any strides but the last); caches [NB, BS, Hkv, D]; block_tables
    [S, max_blocks] int32; query_start_loc [S+1] int32; context_lens [S] int32 (new tokens
    included). Query i of a sequence with q_len new tokens sits at position
    context_len - q_len + i.

    Returns out [T, H, D] in q's dtype; the softmax runs in fp32. plan: always None (the
    kernel reads the tables itself; the argument keeps the twin's signature). Needs the
    kernels loaded (kernels.cpu.available(), as select_backend calls it)."""
    _check(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    ops = torch.ops.palm_cpu
    if out is None:
        return ops.paged_attention(
            q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
        )
    ops.paged_attention_out(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, out
    )
    return out


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """What a caller gets wrong; the C++ side checks the rest (shapes against each other,
    block ids within the cache) before it reads anything."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"q [T, H, D] and caches [NB, BS, Hkv, D]: got {q.shape}, {k_cache.shape}")
    check_cache_dtypes(q, k_cache, v_cache)
    if q.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q needs a contiguous last dimension, the caches must be contiguous")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("context_lens", context_lens)):  # fmt: skip
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous int32")
