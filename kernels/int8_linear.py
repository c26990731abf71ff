"""Weight-only int8 linear: y = x @ (weight * scales[:, None]).T, the torch twin.

weight [N, K] int8 holds each output channel quantized symmetrically, scales [N] its step
(model/quantization.py makes them). The twin dequantizes the whole weight and multiplies
in fp32: the oracle of the compiled CPU kernel (kernels/cpu/int8_linear.cpp) and of the
Triton one (kernels/triton/int8_linear.py), and the path of the torch backend.

Each backend stores the weight in the layout its kernel reads (Int8Matmul.pack): the twin
and Triton keep [N, K]; the CPU kernel packs panels of 16 channels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out_features: int | None = None
) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype; weight [N, K] int8, scales [N] (any float dtype).
    out_features: the kernels' signature (the twin reads N from the weight)."""
    _check(x, weight, scales)
    dequantized = weight.float() * scales.float()[:, None]  # (N, K)
    return (x.float() @ dequantized.T).to(x.dtype)


def keep_layout(weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin's and Triton's layout: weight [N, K] int8 contiguous, scales [N] fp32."""
    return weight.contiguous(), scales.float().contiguous()


@dataclass(frozen=True)
class Int8Matmul:
    """How one backend multiplies by int8 weights: pack(weight [N, K] int8, scales [N]) ->
    (packed, scales) once at load, then linear(x [M, K], packed, scales, N) -> [M, N]."""

    name: str
    pack: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def twin_int8_matmul() -> Int8Matmul:
    return Int8Matmul("torch", keep_layout, int8_linear)


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x [M, K] and weight [N, K] expected, got {x.shape} and {weight.shape}")
    if weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8, got {weight.dtype}")
    if scales.shape != (weight.shape[0],):
        raise ValueError(f"scales must be [N] = [{weight.shape[0]}], got {tuple(scales.shape)}")
