"""The compiled rotary embedding and KV-cache write (kernels/cpu/) equal their torch twins
bit for bit, separately and fused. Both work in place, so whole tensors are compared: every
element they should write, and every element they must leave alone (NaN stays NaN)."""

from __future__ import annotations

import pytest
import torch

from palm_serve.kernels import (
    build_cos_sin_cache,
    build_xpos_scale_cache,
    cpu,
    rotary_embedding,
    write_kv_cache,
)

from triton_cases import rotate_fused

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (k and v, the caches): the model's dtype, or 16-bit caches under fp32 (--kv-cache-dtype)
WRITE_DTYPES = [(dtype, dtype) for dtype in DTYPES] + [
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
]
MAX_POS = 512
# Slots across shuffled blocks, block edges (15, 16, 17), the last slot, and padding (-1).
SLOTS = [3 * 16 + 0, -1, 0, 15, 16, 17, 5 * 16 + 15, -1, 2 * 16 + 7]
POSITIONS = [0, 1, 2, 15, 16, 17, 300, MAX_POS - 1, 7]


# Fails, never skips, where the C++ kernels did not build (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _tables(head_dim: int, xpos: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    cos_sin = build_cos_sin_cache(head_dim, MAX_POS)
    return cos_sin, build_xpos_scale_cache(head_dim, MAX_POS, 512.0) if xpos else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads, xpos", [(64, 8, 1, False), (128, 6, 2, True),
                                                             (20, 4, 2, True)])  # fmt: skip
def test_rotary(dtype, head_dim, heads, kv_heads, xpos) -> None:
    # q and k as strided views of one fused projection [T, H + Hkv + 1, D]: the last head
    # column stands for v and must come back untouched.
    fused = torch.randn(len(POSITIONS), heads + kv_heads + 1, head_dim).to(dtype)
    args = (fused, heads, kv_heads, torch.tensor(POSITIONS), *_tables(head_dim, xpos))
    expected = rotate_fused("palm_serve.kernels", *args)
    actual = rotate_fused("palm_serve.kernels.cpu", *args)
    _exact(actual, expected)
    assert torch.equal(actual[:, -1], fused[:, -1])


def test_rotary_with_half_precision_tables() -> None:
    """A model cast to bf16 casts its tables too: the twin computes with them in fp32."""
    fused = torch.randn(len(POSITIONS), 4 + 1 + 1, 32).to(torch.bfloat16)
    cos_sin, xpos = (t.to(torch.bfloat16) for t in _tables(32, xpos=True))
    args = (fused, 4, 1, torch.tensor(POSITIONS, dtype=torch.int32), cos_sin, xpos)
    _exact(rotate_fused("palm_serve.kernels.cpu", *args), rotate_fused("palm_serve.kernels", *args))


def _caches(dtype, kv_heads, head_dim, num_blocks=6) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, 16, kv_heads, head_dim)
    return torch.full(shape, float("nan"), dtype=dtype), torch.full(
        shape, float("nan"), dtype=dtype
    )


@pytest.mark.parametrize("dtype, cache_dtype", WRITE_DTYPES)
@pytest.mark.parametrize("head_dim, kv_heads", [(64, 1), (128, 2)])
def test_write_kv_cache(dtype, cache_dtype, head_dim, kv_heads) -> None:
    k = torch.randn(len(SLOTS), kv_heads, head_dim).to(dtype)
    v = torch.randn(len(SLOTS), kv_heads, head_dim).to(dtype)
    slots = torch.tensor(SLOTS)
    k_ref, v_ref = _caches(cache_dtype, kv_heads, head_dim)
    write_kv_cache(k, v, k_ref, v_ref, slots)
    k_out, v_out = _caches(cache_dtype, kv_heads, head_dim)
    cpu.write_kv_cache(k, v, k_out, v_out, slots)
    _exact(k_out, k_ref)
    _exact(v_out, v_ref)
    assert int(k_out.isnan().any(dim=(2, 3)).logical_not().sum()) == 7  # 7 real slots written


@pytest.mark.parametrize("dtype, cache_dtype", WRITE_DTYPES)
@pytest.mark.parametrize("heads, kv_heads, xpos", [(8, 1, False), (6, 2, True)])
@pytest.mark.parametrize("tokens", [len(SLOTS), 300])  # one thread's worth, and several
def test_fused_equals_rotary_then_write(dtype, cache_dtype, heads, kv_heads, xpos, tokens) -> None:
    head_dim = 64
    fused = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    positions = torch.tensor((POSITIONS * tokens)[:tokens])
    slots = torch.tensor((SLOTS + list(range(100, 100 + tokens)))[:tokens])
    tables = _tables(head_dim, xpos)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # strided views, as in the model
        return x[:, :heads], x[:, heads : heads + kv_heads], x[:, heads + kv_heads :]

    expected, actual = fused.clone(), fused.clone()
    k_ref, v_ref = _caches(cache_dtype, kv_heads, head_dim, num_blocks=30)
    k_out, v_out = _caches(cache_dtype, kv_heads, head_dim, num_blocks=30)
    q, k, v = split(expected)
    rotary_embedding(q, k, positions, *tables)
    write_kv_cache(k, v, k_ref, v_ref, slots)
    q, k, v = split(actual)
    cpu.rotary_write_kv_cache(q, k, v, k_out, v_out, positions, slots, *tables)
    _exact(actual, expected)
    _exact(k_out, k_ref)
    _exact(v_out, v_ref)


def test_rejects_bad_inputs() -> None:
    q, k = torch.randn(3, 4, 16), torch.randn(3, 1, 16)
    cos_sin = build_cos_sin_cache(16, 8)
    with pytest.raises(RuntimeError, match="outside the rotary tables"):
        cpu.rotary_embedding(q, k, torch.tensor([0, 1, 8]), cos_sin)
    with pytest.raises(ValueError, match="contiguous last"):
        cpu.rotary_embedding(q.transpose(1, 2), k, torch.tensor([0, 1, 2]), cos_sin)
    k_cache = torch.zeros(2, 4, 1, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.write_kv_cache(k, k, k_cache, k_cache.clone(), torch.tensor([0, 8, 1]))
    half, bf16_cache = k.half(), k_cache.bfloat16()  # 16-bit caches only under fp32 k
    with pytest.raises(RuntimeError, match="k's, or under an fp32 k"):
        cpu.write_kv_cache(half, half, bf16_cache, bf16_cache.clone(), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="share one dtype"):
        cpu.write_kv_cache(k, k, bf16_cache, k_cache.half(), torch.tensor([0, 1, 2]))


def test_traceable_without_graph_break() -> None:
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    caches = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    positions, slots = torch.tensor([0, 1, 5]), torch.tensor([0, -1, 7])
    cos_sin = build_cos_sin_cache(16, 8)
    ops = torch.ops.palm_cpu
    torch.library.opcheck(ops.rotary_embedding.default, (q, k, positions, cos_sin, None))
    torch.library.opcheck(ops.write_kv_cache.default, (k, v, *caches, slots))
    torch.library.opcheck(ops.rotary_write_kv_cache.default,
                          (q, k, v, *caches, positions, slots, cos_sin, None))  # fmt: skip
