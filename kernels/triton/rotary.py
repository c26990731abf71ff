"""Rotary position embedding (RoFormer, arXiv:2104.09864) with optional xPos scaling
(arXiv:2212.10554), in place on q and k: the Triton twin of kernels/rotary.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import COMPILE_OPTIONS, check_same_device, for_device


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, H, D], rotated in place
    k_ptr,  # [T, Hkv, D], rotated in place
    positions_ptr,  # [T] int
    cos_sin_ptr,  # [P, D]: cos of the D/2 frequencies, then their sin
    xpos_ptr,  # [P, D/2] q's xPos factor (k takes its inverse); unused without USE_XPOS
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_xpos,
    n_q_heads,
    n_k_heads,
    HALF: tl.constexpr,  # D / 2
    HALF_PAD: tl.constexpr,  # HALF rounded up to a power of two
    HEADS_PAD: tl.constexpr,  # n_q_heads rounded up to a power of two (>= n_k_heads)
    USE_XPOS: tl.constexpr,
):
    # grid (T, 2): axis 1 picks the tensor, 0 = q, 1 = k; one program rotates all heads of
    # one token, so the position's cos/sin row is read once per tensor.
    t = tl.program_id(0)
    is_k = tl.program_id(1) == 1
    pos = tl.load(positions_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    h = tl.arange(0, HEADS_PAD)
    d_ok = d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cos + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
    if is_k:
        row = k_ptr + t.to(tl.int64) * stride_kt + h[:, None] * stride_kh  # (HEADS_PAD, 1)
        mask = (h < n_k_heads)[:, None] & d_ok[None, :]
    else:
        row = q_ptr + t.to(tl.int64) * stride_qt + h[:, None] * stride_qh
        mask = (h < n_q_heads)[:, None] & d_ok[None, :]
    x1 = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)  # (HEADS_PAD, HALF_PAD)
    x2 = tl.load(row + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    if USE_XPOS:
        # Scale after rotating, as the twin does, so both round the same way.
        scale = tl.load(xpos_ptr + pos * stride_xpos + d, mask=d_ok, other=1.0).to(tl.float32)
        if is_k:
            scale = 1.0 / scale
        out1 = out1 * scale[None, :]
        out2 = out2 * scale[None, :]
    tl.store(row + d[None, :], out1.to(row.dtype.element_ty), mask=mask)
    tl.store(row + HALF + d[None, :], out2.to(row.dtype.element_ty), mask=mask)


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
    num_tokens, n_q_heads, head_dim = q.shape
    _check(q, k, positions, cos_sin_cache, xpos_scale_cache)
    if num_tokens == 0:
        return
    xpos = xpos_scale_cache if xpos_scale_cache is not None else cos_sin_cache
    kernel = for_device(_rotary_kernel, q.device)
    kernel[(num_tokens, 2)](
        q,
        k,
        positions,
        cos_sin_cache,
        xpos,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        xpos.stride(0),
        n_q_heads,
        k.shape[1],
        HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        HEADS_PAD=triton.next_power_of_2(n_q_heads),
        USE_XPOS=xpos_scale_cache is not None,
        num_warps=1 if n_q_heads * head_dim <= 1024 else 4,
        **COMPILE_OPTIONS,
    )


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    xpos_scale_cache: torch.Tensor | None,
) -> None:
    head_dim = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != head_dim:
        raise ValueError(f"q [T, H, D] and k [T, Hkv, D] expected, got {q.shape} and {k.shape}")
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(
            f"head_dim {head_dim} must be even and match cos_sin_cache {cos_sin_cache.shape}"
        )
    if k.shape[1] > q.shape[1]:
        raise ValueError("k has more heads than q")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dimension")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [T], got {positions.shape}")
    check_same_device("q", q, k=k, positions=positions, cos_sin_cache=cos_sin_cache,
                      xpos_scale_cache=xpos_scale_cache)  # fmt: skip
    if xpos_scale_cache is not None and (
        xpos_scale_cache.shape[-1] != head_dim // 2 or xpos_scale_cache.stride(-1) != 1
    ):
        raise ValueError(
            f"xpos_scale_cache must be [P, {head_dim // 2}] with a contiguous last dim"
        )
