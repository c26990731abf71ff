"""Scatter of this step's keys and values into the paged cache: the torch twin."""

from __future__ import annotations

import torch


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] go to slot slot_mapping[t] of the caches [NB, BS, Hkv, D].

    A slot of -1 is padding and is skipped."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    scatter_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def scatter_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """write_kv_cache where every slot is a real one (no -1, as the engine sends): no
    data-dependent branch, so torch.compile traces it into the step's one graph, where
    inductor fuses the scatter with the rotary that precedes it."""
    num_blocks, block_size, n_kv_heads, head_dim = k_cache.shape
    flat_k = k_cache.view(num_blocks * block_size, n_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, n_kv_heads, head_dim)
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))
