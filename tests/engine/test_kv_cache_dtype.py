"""A 16-bit KV cache under fp32 weights (EngineConfig.kv_cache_dtype, --kv-cache-dtype):
the pool holds twice the tokens in the same memory, and greedy output equals that of the
dense forward whose keys (after rotary) and values are rounded to the cache's dtype, the
one thing the cache changes. Through the torch twins and the compiled CPU kernels."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import resolve_kv_cache_dtype
from palm_serve.kernels import cpu_backend
from palm_serve.kernels.rotary import rotate
from palm_serve.model import decoder
from palm_serve.model.attention import DenseRotary

import engine_helpers
from engine_helpers import check_greedy, greedy, make_context_model, make_engine, run, tokens_of

one_torch_thread = engine_helpers.one_torch_thread


def dense_attention_over_cache(dtype: torch.dtype):
    """model.attention.dense_causal_attention with K (rotated) and V rounded to dtype, as
    the paged path stores them; q, the scores and the softmax stay fp32."""

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: DenseRotary, scale: float
    ) -> torch.Tensor:
        group = q.shape[2] // k.shape[2]
        q = rotate(q, rope.cos, rope.sin, rope.q_scale).transpose(1, 2)
        k = rotate(k, rope.cos, rope.sin, rope.k_scale).to(dtype).float()
        k = k.transpose(1, 2).repeat_interleave(group, 1)
        v = v.to(dtype).float().transpose(1, 2).repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return out.transpose(1, 2)

    return attend


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_greedy_over_a_16bit_cache_equals_dense_with_rounded_kv(
    cache_dtype: str, kernels: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if kernels == "cpu":
        request.getfixturevalue("cpu_kernels_built")
    model = make_context_model()
    if kernels == "cpu":
        model.kernels = cpu_backend()
    dtype = getattr(torch, cache_dtype)
    engine = make_engine(
        model, num_blocks=128, block_size=8, max_num_batched_tokens=48, kv_cache_dtype=cache_dtype
    )
    assert engine.core.runner.kv_cache.k[0].dtype == dtype
    rng = random.Random(5)
    prompts, arrivals = {}, {}
    for i in range(6):
        prompts[f"r{i}"] = [rng.randrange(97) for _ in range(rng.randint(1, 70))]
        arrivals.setdefault(rng.randrange(4), []).append((f"r{i}", prompts[f"r{i}"], greedy(10)))
    outputs = run(engine, arrivals)
    monkeypatch.setattr(decoder, "dense_causal_attention", dense_attention_over_cache(dtype))
    assert set(outputs) == set(prompts)
    for request_id, outs in outputs.items():
        check_greedy(model, prompts[request_id], tokens_of(outs))


def test_a_16bit_pool_holds_twice_the_blocks() -> None:
    model = make_context_model()
    memory = 1 << 20
    fp32 = make_engine(model, num_blocks=None, kv_cache_memory_bytes=memory)
    bf16 = make_engine(
        model, num_blocks=None, kv_cache_memory_bytes=memory, kv_cache_dtype="bfloat16"
    )
    assert bf16.block_manager.num_blocks == 2 * fp32.block_manager.num_blocks
    cache = bf16.core.runner.kv_cache
    assert sum(t.nbytes for t in (*cache.k, *cache.v)) <= memory


def test_which_cache_dtypes_go_with_which_weights() -> None:
    assert resolve_kv_cache_dtype(None, torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="kv_cache_dtype float16 needs float32 weights"):
        resolve_kv_cache_dtype("float16", torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype float32 needs float32 weights"):
        resolve_kv_cache_dtype("float32", torch.float16)
    with pytest.raises(ValueError, match="EngineConfig.kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
