"""The Triton weight-only int8 linear equals its torch twin (dequantize, then matmul), run
through Triton's interpreter (in a worker process, see interpreter_worker.py), on the
shapes that hurt: one row, rows short of a 16-row tile and past one, K odd and shorter
than a K tile, N short of a 64-channel tile and one past it; fp32, fp16 and bf16
activations, and each of the three tile shapes tile_shape picks by row count."""

from __future__ import annotations

import pytest
import torch

from palm_serve.kernels.int8_linear import int8_linear as twin_int8_linear

from interpreter_worker import worker
from triton_cases import assert_matches

MODULE = "palm_serve.kernels.triton.int8_linear"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N): decode tiles (M <= 16), a 64-row tile (M = 17), a 128-row tile (M = 65).
SHAPES = [(1, 7, 5), (1, 300, 65), (3, 129, 200), (16, 64, 64), (17, 33, 1), (65, 96, 130)]


def _case(m: int, k: int, n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.02 + 1e-3
    return x, weight, scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_int8_linear_equals_twin(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    x, weight, scales = _case(m, k, n, dtype)
    actual, _ = worker().call(MODULE, "int8_linear", x, weight, scales, n)
    expected = twin_int8_linear(x, weight, scales)
    # fp32: the twin rounds (q * s) before its dot, the kernel scales the dot: ulps of |y|
    atol = 1e-4 * max(1.0, expected.abs().max().item())
    print(f"int8_linear {dtype} {m}x{k}x{n}: {assert_matches(actual, expected, atol):.3g}")


def test_wrapper_refuses_bad_inputs() -> None:
    """Checked before any launch (so in this process, which does not interpret)."""
    from palm_serve.kernels.triton.int8_linear import int8_linear

    x, weight, scales = _case(2, 8, 4, torch.float16)
    with pytest.raises(ValueError, match="contiguous float32"):
        int8_linear(x, weight, scales.half(), 4)
    with pytest.raises(ValueError, match="weight \\[5, K\\]"):
        int8_linear(x, weight, scales, 5)
    with pytest.raises(ValueError, match="contiguous int8"):
        int8_linear(x, weight.float(), scales, 4)
