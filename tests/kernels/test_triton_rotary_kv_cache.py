"""The Triton rotary embedding and KV-cache write equal their torch twins, run through
Triton's interpreter (in a worker process, see interpreter_worker.py). Both kernels work in
place, so whole tensors are compared: every element the kernel should write, and every
element it must leave alone."""

from __future__ import annotations

import pytest
import torch

from palm_serve.kernels import build_cos_sin_cache, build_xpos_scale_cache, write_kv_cache

from interpreter_worker import worker
from triton_cases import assert_matches, rotate_fused

TRITON = "palm_serve.kernels.triton"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POS = 512


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads, xpos", [(64, 8, 1, False), (128, 6, 2, True)])
def test_rotary(dtype, head_dim, heads, kv_heads, xpos) -> None:
    # q and k as strided views of one fused projection [T, H + Hkv + 1, D]: the last head
    # column stands for v and must come back untouched.
    fused = torch.randn(9, heads + kv_heads + 1, head_dim).to(dtype)
    positions = torch.tensor([0, 1, 2, 15, 16, 17, 300, MAX_POS - 1, 7])
    cos_sin = build_cos_sin_cache(head_dim, MAX_POS)
    xpos_cache = build_xpos_scale_cache(head_dim, MAX_POS, 512.0) if xpos else None
    args = (fused, heads, kv_heads, positions, cos_sin, xpos_cache)
    expected = rotate_fused("palm_serve.kernels", *args)
    actual, _ = worker().call("triton_cases", "rotate_fused", TRITON, *args)
    print(f"rotary {dtype} D={head_dim} xpos={xpos}: {assert_matches(actual, expected):.3g}")
    assert torch.equal(actual[:, -1], fused[:, -1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, kv_heads", [(64, 1), (128, 2)])
def test_write_kv_cache(dtype, head_dim, kv_heads) -> None:
    num_blocks, block_size = 6, 16
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)  # untouched slots stay NaN
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    # Slots across shuffled blocks, block edges (15, 16, 17), the last slot, and padding.
    slots = torch.tensor([3 * 16 + 0, -1, 0, 15, 16, 17, 5 * 16 + 15, -1, 2 * 16 + 7])
    k = torch.randn(len(slots), kv_heads, head_dim).to(dtype)
    v = torch.randn(len(slots), kv_heads, head_dim).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_ref, v_ref, slots)
    _, (_, _, k_out, v_out, _) = worker().call(TRITON, "write_kv_cache", k, v, k_cache,
                                                  v_cache, slots)  # fmt: skip
    # A copy: bit-exact, NaN where nothing was written.
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_out, v_ref, rtol=0, atol=0, equal_nan=True)
    assert int(k_out.isnan().any(dim=(2, 3)).logical_not().sum()) == 7  # 7 real slots written
