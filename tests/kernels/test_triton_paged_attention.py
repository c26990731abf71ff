"""The Triton paged attention equals its torch twin, run through Triton's interpreter.

Shapes chosen to hurt: contexts of 1, block_size - 1, block_size, block_size + 1 and a few
hundred; shuffled block tables padded with a poisoned block; a long prefill chunk over a
cached prefix in the same batch as many decodes; grouped heads (GROUP 8, 4, 3); with and
without split-K. Outputs start as NaN, so a row the kernel never writes fails."""

from __future__ import annotations

import importlib

import pytest
import torch

from palm_serve.kernels import paged_attention as torch_paged_attention

from interpreter_worker import worker
from triton_cases import FP32_ATOL_ATTENTION, assert_matches, make_paged_batch

split_policy = importlib.import_module("palm_serve.kernels.triton.split_policy")

BS = 16
# Decodes only (T == S): every awkward context length, one long.
DECODE_CTX = [1, BS - 1, BS, BS + 1, 300, 2 * BS + 3]
# A 40-token chunk over a 250-token cached prefix, a fresh 5-token prompt, eight decodes.
MIXED_Q = [40, 1, 1, 5, 1, 1, 1, 1, 1, 1]
MIXED_CTX = [290, 1, BS - 1, 5, BS, BS + 1, 2, 70, 33, 120]

# (dtype, head_dim, heads, kv_heads, num_splits): a covering set, not the full product,
# because the interpreter costs 0.3-3 s a call. None = the split policy's own choice.
DECODE_VARIANTS = [
    (torch.float32, 64, 8, 1, None),
    (torch.float32, 128, 8, 2, 3),
    (torch.float32, 64, 6, 2, 2),
    (torch.float16, 64, 8, 2, None),
    (torch.float16, 128, 8, 1, 4),
    (torch.bfloat16, 128, 8, 1, None),
    (torch.bfloat16, 64, 8, 2, 2),
]
MIXED_VARIANTS = [
    (torch.float32, 64, 8, 1, None),
    (torch.float32, 128, 8, 2, 3),
    (torch.float16, 128, 8, 1, None),
    (torch.bfloat16, 64, 6, 2, 2),
]


def _run(query_lens, context_lens, dtype, head_dim, heads, kv_heads, splits, block_size=BS):
    batch = make_paged_batch(query_lens, context_lens, heads=heads, kv_heads=kv_heads,
                             head_dim=head_dim, block_size=block_size, dtype=dtype)  # fmt: skip
    expected = torch_paged_attention(*batch.args(*batch.clean_caches()))
    out = torch.full_like(batch.q, float("nan"))
    # The wrapper returns the NaN-filled `out` it was given, now written.
    result, _ = worker().call("palm_serve.kernels.triton", "paged_attention",
                               *batch.args(batch.k_cache, batch.v_cache), out=out,
                               num_splits=splits)  # fmt: skip
    return assert_matches(result, expected, FP32_ATOL_ATTENTION)


@pytest.mark.parametrize("dtype, head_dim, heads, kv_heads, splits", DECODE_VARIANTS)
def test_decodes_at_block_edges(dtype, head_dim, heads, kv_heads, splits) -> None:
    q_lens = [1] * len(DECODE_CTX)
    diff = _run(q_lens, DECODE_CTX, dtype, head_dim, heads, kv_heads, splits)
    print(f"decode {dtype} D={head_dim} H={heads}/{kv_heads} splits={splits}: {diff:.3g}")


@pytest.mark.parametrize("dtype, head_dim, heads, kv_heads, splits", MIXED_VARIANTS)
def test_mixed_prefill_and_decodes(dtype, head_dim, heads, kv_heads, splits) -> None:
    diff = _run(MIXED_Q, MIXED_CTX, dtype, head_dim, heads, kv_heads, splits)
    print(f"mixed {dtype} D={head_dim} H={heads}/{kv_heads} splits={splits}: {diff:.3g}")


@pytest.mark.parametrize("cache_dtype, splits", [(torch.bfloat16, None), (torch.float16, 3)])
def test_fp32_q_over_16bit_cache(cache_dtype: torch.dtype, splits: int | None) -> None:
    """--kv-cache-dtype: K, V and P in fp32 over what the cache holds, as the twin reads it."""
    batch = make_paged_batch(MIXED_Q, MIXED_CTX, heads=8, kv_heads=2, head_dim=64,
                             block_size=BS, dtype=torch.float32)  # fmt: skip
    k_cache, v_cache = batch.k_cache.to(cache_dtype), batch.v_cache.to(cache_dtype)
    expected = torch_paged_attention(*batch.args(k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)))
    out = torch.full_like(batch.q, float("nan"))
    result, _ = worker().call("palm_serve.kernels.triton", "paged_attention",
                               *batch.args(k_cache, v_cache), out=out,
                               num_splits=splits)  # fmt: skip
    diff = assert_matches(result, expected, FP32_ATOL_ATTENTION)
    print(f"fp32 q over {cache_dtype} splits={splits}: {diff:.3g}")


def test_odd_block_size_and_head_dim() -> None:
    """block_size 5 (keys of one BLOCK_N step span many blocks) and head_dim 48 (padded)."""
    _run([3, 1, 1, 1], [23, 4, 5, 6], torch.float32, 48, 4, 1, None, block_size=5)


def test_split_policy() -> None:
    def choose(num_tiles: int, max_kv_steps: int, block_n: int = 64) -> int:
        return split_policy.choose_num_splits(num_tiles, 1, max_kv_steps, block_n, num_sms=108)

    assert choose(num_tiles=256, max_kv_steps=128) == 1  # busy
    assert choose(num_tiles=4, max_kv_steps=128) == 16  # capped
    assert choose(num_tiles=4, max_kv_steps=32) == 8  # 2048 keys: long enough, 4 steps a split
    assert choose(num_tiles=64, max_kv_steps=128) == 4  # by occupancy
    assert choose(num_tiles=4, max_kv_steps=31) == 1  # 1984 keys: too short to pay for a merge
    assert choose(num_tiles=4, max_kv_steps=16) == 1  # 1024 keys: slower split on an H200
    assert choose(num_tiles=4, max_kv_steps=64, block_n=32) == 16  # fp32's 32-key steps
    assert choose(num_tiles=4, max_kv_steps=63, block_n=32) == 1
