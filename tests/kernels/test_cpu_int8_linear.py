"""The compiled CPU int8 linear (kernels/cpu/int8_linear.cpp) equals its torch twin
(dequantize, then an fp32 matmul) on awkward shapes: one row and row counts that leave a
partial 4-row tile, K odd or shorter than the 4-way unrolling, N short of a 16-channel
panel or one past it; with one thread and with two. The extension must build here: a
failed build fails these tests, it never skips them."""

from __future__ import annotations

import pytest
import torch
from torch_threads import torch_threads

from palm_serve.kernels.cpu import cpu_int8_matmul
from palm_serve.kernels.int8_linear import int8_linear as twin_int8_linear

# The twin rounds (x @ (q * s).T), the kernel (x @ q.T) * s: a few fp32 ulps of |y|.
RTOL = 2e-6
# (M, K, N)
SHAPES = [(1, 1, 1), (1, 7, 15), (1, 512, 768), (2, 3, 17), (3, 17, 33), (5, 513, 16),
          (9, 1408, 31), (33, 64, 700), (256, 96, 48)]  # fmt: skip


# Fails, never skips, where the C++ kernels did not build (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def _case(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.02 + 1e-3
    return x, weight, scales


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_int8_linear_equals_twin(m: int, k: int, n: int, threads: int) -> None:
    x, weight, scales = _case(m, k, n, seed=m * 1000 + k + n)
    matmul = cpu_int8_matmul()
    packed, packed_scales = matmul.pack(weight, scales)
    with torch_threads(threads):
        actual = matmul.linear(x, packed, packed_scales, n)
    expected = twin_int8_linear(x, weight, scales)
    assert actual.shape == (m, n) and actual.dtype == torch.float32
    limit = RTOL * expected.abs().max().item() * max(1.0, k**0.5)
    assert (actual - expected).abs().max().item() <= limit


def test_strided_rows_are_read_in_place() -> None:
    """A view of a wider tensor (the model's rows may be one): rows at their stride."""
    x, weight, scales = _case(6, 40, 20, seed=1)
    wide = torch.randn(6, 64)
    wide[:, :40] = x
    matmul = cpu_int8_matmul()
    packed, packed_scales = matmul.pack(weight, scales)
    actual = matmul.linear(wide[:, :40], packed, packed_scales, 20)
    torch.testing.assert_close(actual, twin_int8_linear(x, weight, scales), rtol=0, atol=1e-5)


def test_bad_inputs_are_refused() -> None:
    x, weight, scales = _case(2, 8, 4, seed=2)
    matmul = cpu_int8_matmul()
    packed, packed_scales = matmul.pack(weight, scales)
    with pytest.raises(ValueError, match="float32 activations"):
        matmul.linear(x.bfloat16(), packed, packed_scales, 4)
    with pytest.raises(RuntimeError, match="K = 9"):
        matmul.linear(torch.randn(2, 9), packed, packed_scales, 4)
    with pytest.raises(ValueError, match="int8"):
        matmul.pack(weight.float(), scales)
