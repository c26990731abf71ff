"""The compiled rotary embedding and KV-cache write (rotary_kv_cache.cpp), separately with
the twins' signatures, or fused into one pass over the tokens. Bit for bit the twins'
results. Need the kernels loaded (kernels.cpu.available())."""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    xpos_scale_cache: torch.Tensor | None = None,
) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place (any strides but the last), at
    positions [T] int64 of cos_sin_cache [P, D] fp32; with xpos_scale_cache [P, D/2] fp32,
    q is scaled by it and k by its inverse."""
    _check_rows(q=q, k=k)
    positions, cos_sin_cache, xpos_scale_cache = _tables(positions, cos_sin_cache, xpos_scale_cache)
    torch.ops.palm_cpu.rotary_embedding(q, k, positions, cos_sin_cache, xpos_scale_cache)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] go to slot slot_mapping[t] (int64; -1 skips the token) of the
    caches [NB, BS, Hkv, D], which have k's dtype."""
    _check_rows(k=k, v=v)
    torch.ops.palm_cpu.write_kv_cache(k, v, k_cache, v_cache, slot_mapping.long())


def rotary_write_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    xpos_scale_cache: torch.Tensor | None = None,
) -> None:
    """rotary_embedding(q, k, ...) then write_kv_cache(k, v, ...), in one pass."""
    _check_rows(q=q, k=k, v=v)
    positions, cos_sin_cache, xpos_scale_cache = _tables(positions, cos_sin_cache, xpos_scale_cache)
    torch.ops.palm_cpu.rotary_write_kv_cache(
        q, k, v, k_cache, v_cache, positions, slot_mapping.long(), cos_sin_cache, xpos_scale_cache
    )


def _tables(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, xpos_scale_cache: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel reads int64 positions and fp32 tables, as the twin computes (a model cast
    to half precision casts its tables too; no-ops otherwise)."""
    if xpos_scale_cache is not None:
        xpos_scale_cache = xpos_scale_cache.float().contiguous()
    return positions.long(), cos_sin_cache.float().contiguous(), xpos_scale_cache


def _check_rows(**rows: torch.Tensor) -> None:
    """What a caller gets wrong; the C++ side checks shapes, tables and slot bounds."""
    for name, x in rows.items():
        if x.dim() != 3 or x.stride(-1) != 1 or x.dtype not in _DTYPES:
            raise ValueError(
                f"{name} must be [T, heads, D], one of {_DTYPES}, with a contiguous last "
                f"dimension: got {tuple(x.shape)} {x.dtype} strides {x.stride()}"
            )
