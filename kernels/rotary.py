"""Rotary position embedding (RoFormer, arXiv:2104.09864) with optional xPos decay
(arXiv:2212.10554): the torch twin, and the tables both twins read."""

from __future__ import annotations

import torch


def build_cos_sin_cache(
    head_dim: int, max_positions: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[max_positions, head_dim]: cos of the half-dim frequencies, then their sin.

    Computed in fp32 exactly as the reference does (outer product of t and inv_freq)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (P, D/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def build_xpos_scale_cache(
    head_dim: int, max_positions: int, scale_base: float, center: int | None = None
) -> torch.Tensor:
    """[max_positions, head_dim/2] fp32: the factor q is multiplied by at each position.

    k is multiplied by its inverse, so q_i . k_j carries scale ** ((i - j) / scale_base):
    only the distance matters. The reference centres the power at half the current
    sequence length; with a KV cache the centre must not move, so it is fixed here (at
    half the maximum length, which keeps the factors' range symmetric)."""
    center = max_positions // 2 if center is None else center
    scale = (torch.arange(0, head_dim, 2).float() + 0.4 * head_dim) / (1.4 * head_dim)
    power = (torch.arange(max_positions, dtype=torch.float32) - center) / scale_base
    return scale.unsqueeze(0) ** power.unsqueeze(1)  # (P, D/2)


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    xpos_scale_cache: torch.Tensor | None = None,
) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place, rotate-half convention.

    positions [T] index cos_sin_cache [P, D]; with xpos_scale_cache [P, D/2], q is scaled
    by it and k by its inverse."""
    half = q.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions).float()  # (T, D)
    cos = cos_sin[:, :half].unsqueeze(1)  # (T, 1, D/2)
    sin = cos_sin[:, half:].unsqueeze(1)
    q_scale = k_scale = None
    if xpos_scale_cache is not None:
        q_scale = xpos_scale_cache.index_select(0, positions).float().unsqueeze(1)
        k_scale = 1.0 / q_scale
    q.copy_(rotate(q, cos, sin, q_scale))
    k.copy_(rotate(k, cos, sin, k_scale))


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate-half rotary on x [..., D] with cos, sin (and scale) broadcastable to
    [..., D/2]; computes in fp32 and returns x's dtype. Pure, so autograd can run it."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if scale is not None:
        out1 = out1 * scale
        out2 = out2 * scale
    return torch.cat((out1, out2), dim=-1).to(x.dtype)
