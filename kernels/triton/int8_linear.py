"""Weight-only int8 linear on the GPU: y = x @ (weight * scales[:, None]).T, the Triton twin
of kernels/int8_linear.py. The int8 weight tile is loaded as int8 (a quarter of fp32's bytes,
half of fp16's) and widened in registers to the activations' dtype (exact: |w| <= 127 fits
fp16's and bf16's mantissas), multiplied on the tensor cores with fp32 accumulation, and the
per-channel scale is applied once per output tile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..int8_linear import Int8Matmul, keep_layout
from .launch import COMPILE_OPTIONS, check_same_device, for_device, is_interpreted


@triton.jit
def _int8_linear_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32
    w_ptr,  # [N, K] int8
    scales_ptr,  # [N] fp32
    out_ptr,  # [M, N] in x's dtype
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 activations (exact FMA dots)
    DOT_FP32: tl.constexpr,  # interpreter only: numpy cannot matmul bf16 (stored as uint16)
):
    # grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): one output tile per program.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # (K, N)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)  # exact: |w| <= 127
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scales_ptr + rn, mask=n_ok, other=0.0)
    out = acc * scale[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tile_shape(num_rows: int) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, launch options) for M rows: decodes are a thin strip
    (16 rows, the least tl.dot takes) streaming wide weight tiles; prefill gets square
    tiles that reuse each weight tile across many rows."""
    if num_rows <= 16:
        return 16, 64, 128, {"num_warps": 4, "num_stages": 4, **COMPILE_OPTIONS}
    if num_rows <= 64:
        return 64, 64, 64, {"num_warps": 4, "num_stages": 3, **COMPILE_OPTIONS}
    return 128, 128, 64, {"num_warps": 8, "num_stages": 3, **COMPILE_OPTIONS}


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out_features: int
) -> torch.Tensor:
    """x [M, K] (contiguous last dimension), weight [N, K] int8 contiguous, scales [N]
    fp32 -> [M, N] in x's dtype."""
    _check(x, weight, scales, out_features)
    num_rows, num_cols = x.shape
    out = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block_m, block_n, block_k, options = tile_shape(num_rows)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(out_features, block_n))
    for_device(_int8_linear_kernel, x.device)[grid](
        x,
        weight,
        scales,
        out,
        num_rows,
        out_features,
        num_cols,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=x.dtype == torch.bfloat16 and is_interpreted(_int8_linear_kernel),
        **options,
    )
    return out


def triton_int8_matmul() -> Int8Matmul:
    return Int8Matmul("triton", keep_layout, int8_linear)


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, n: int) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape != (n, x.shape[1]):
        raise ValueError(f"x [M, K] and weight [{n}, K] expected, got {x.shape}, {weight.shape}")
    if weight.dtype != torch.int8 or not weight.is_contiguous():
        raise ValueError("weight must be contiguous int8")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        raise ValueError(f"x must be fp16, bf16 or fp32 with a contiguous last dim, got {x.dtype}")
    if scales.dtype != torch.float32 or scales.shape != (n,) or not scales.is_contiguous():
        raise ValueError(f"scales must be contiguous float32 [{n}]")
    check_same_device("x", x, weight=weight, scales=scales)
