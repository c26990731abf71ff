"""Scatter of this step's keys and values into the paged cache: the Triton twin of
kernels/kv_cache.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import COMPILE_OPTIONS, check_same_device, for_device


@triton.jit
def _write_kv_cache_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [NB, BS, Hkv, D]
    v_cache_ptr,  # [NB, BS, Hkv, D], same strides as k_cache (checked by the wrapper)
    slot_mapping_ptr,  # [T] int: block_id * BS + offset, -1 = skip
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    n_kv_heads,
    block_size,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
):
    # One program per token: all its K/V heads, one (HEADS_PAD, D_PAD) tile each.
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, D_PAD)
    # A padding token (slot -1) stores nothing: no head passes its mask.
    live_heads = tl.where(slot >= 0, n_kv_heads, 0)
    mask = (h < live_heads)[:, None] & (d < HEAD_DIM)[None, :]
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    dst = dst + h[:, None] * stride_ch + d[None, :]
    tt = t.to(tl.int64)
    k = tl.load(k_ptr + tt * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + tt * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] go to slot slot_mapping[t] of the caches [NB, BS, Hkv, D].

    A slot of -1 is padding and is skipped."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, n_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kernel = for_device(_write_kv_cache_kernel, k.device)
    kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        n_kv_heads,
        k_cache.shape[1],
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        HEADS_PAD=triton.next_power_of_2(n_kv_heads),
        num_warps=1 if n_kv_heads * head_dim <= 512 else 4,
        **COMPILE_OPTIONS,
    )


def _check(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {k.shape} and {v.shape}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must be [NB, BS, Hkv, D] with the same strides")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {k.shape} does not fit the cache {k_cache.shape}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("k, v and the caches need a contiguous last dimension")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T], got {slot_mapping.shape}")
    check_same_device("k", k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
