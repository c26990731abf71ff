"""The compiled weight-only int8 linear (int8_linear.cpp) behind Int8Matmul's interface:
pack once at load into panels of 16 output channels, then multiply fp32 activations."""

from __future__ import annotations

import torch

from ..int8_linear import Int8Matmul

PANEL = 16  # output channels per packed panel (kPanel in int8_linear.cpp)


def pack_int8_weight(
    weight: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] int8, scales [N] -> panels [ceil(N / 16), K, 16] int8 and scales fp32
    padded to the panels' 16 * ceil(N / 16) channels (the padding is zero)."""
    if weight.dim() != 2 or weight.dtype != torch.int8 or scales.shape != (weight.shape[0],):
        raise ValueError(f"weight [N, K] int8 and scales [N] expected, got {weight.shape}, "
                         f"{weight.dtype}, {tuple(scales.shape)}")  # fmt: skip
    packed = torch.ops.palm_cpu.pack_int8_weight(weight)
    padded = torch.zeros(packed.shape[0] * PANEL, dtype=torch.float32)
    padded[: scales.shape[0]] = scales.float()
    return packed, padded


def int8_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int
) -> torch.Tensor:
    """x [M, K] float32 (contiguous last dimension) -> [M, out_features] float32."""
    if x.dtype != torch.float32:
        raise ValueError(f"the CPU int8 kernel takes float32 activations, got {x.dtype}")
    return torch.ops.palm_cpu.int8_linear(x, packed, scales, out_features)


def cpu_int8_matmul() -> Int8Matmul:
    return Int8Matmul("cpu", pack_int8_weight, int8_linear)
