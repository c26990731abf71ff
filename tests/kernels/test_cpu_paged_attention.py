"""The compiled CPU paged attention (kernels/cpu/) equals its torch twin: fp32 to 1e-6 on
the shapes that hurt (contexts at block edges, partial blocks, many sequences, prefill
chunks among decodes, a 2-token chunk, MQA / GQA / MHA, block_size 1, more K/V heads than
tokens per block, a head_dim that is no multiple of 8), with every unused cache slot NaN
and the output NaN until written. With one thread and with four (context splits merged).

Longer prefill chunks are held against exact fp64 loops instead: on a 130-token chunk over
a 400-token context the twin itself (SDPA's math path in fp32) is 1.4e-6 from the exact
result, so it cannot referee 1e-6 there; the kernel stays within 1e-6 of exact.

The extension must build here: a failed build fails these tests, it never skips them."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avx2_paths import run_on_the_avx2_paths
from torch_threads import torch_threads

from palm_serve.kernels import paged_attention as twin_paged_attention
from palm_serve.kernels.cpu import paged_attention as cpu_paged_attention

from triton_cases import PagedBatch, assert_matches, make_paged_batch

FP32_ATOL = 1e-6


# Fails, never skips, where the C++ kernels did not build (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def _many_sequences(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """n sequences: mostly decodes, some chunks (of 2 to 40 tokens) over cached prefixes."""
    rng = random.Random(seed)
    q_lens = [rng.choice([1, 1, 1, 2, rng.randint(3, 40)]) for _ in range(n)]
    return q_lens, [q + rng.randint(0, 200) for q in q_lens]


BS = 16
MIXED_Q = [40, 1, 1, 5, 1, 1, 1, 1, 1, 2]
MIXED_CTX = [290, 1, BS - 1, 5, BS, BS + 1, 2, 70, 33, 121]
MANY_Q, MANY_CTX = _many_sequences(48)
# name: (query_lens, context_lens, heads, kv_heads, head_dim, block_size)
CASES = {
    "decodes-at-block-edges": ([1] * 7, [1, BS - 1, BS, BS + 1, 300, 2 * BS + 3, 2], 8, 1, 64, BS),
    "mixed-mqa": (MIXED_Q, MIXED_CTX, 8, 1, 64, BS),
    "mixed-gqa-2": (MIXED_Q, MIXED_CTX, 8, 2, 128, BS),
    "mixed-gqa-4": (MIXED_Q, MIXED_CTX, 8, 4, 64, BS),
    "mixed-mha": (MIXED_Q, MIXED_CTX, 4, 4, 32, BS),
    "block-size-1-two-token-chunk": ([2, 1, 1, 7], [2, 9, 33, 40], 6, 2, 64, 1),
    "kv-heads-over-block-size": ([3, 1, 1, 2], [9, 4, 30, 2], 8, 4, 32, 2),
    "many-sequences": (MANY_Q, MANY_CTX, 8, 2, 64, BS),
    "head-dim-44-block-5": ([3, 1, 1, 1], [23, 4, 5, 6], 4, 1, 44, 5),
    # 7 heads to a K/V head: a row's heads in groups of 4, 2 and 1 (the AVX2 per-row step)
    "mixed-gqa-7": (MIXED_Q, MIXED_CTX, 14, 2, 64, BS),
    # 8 and more queries to a K/V head: the AVX-512 tile path with 16-64 lanes at head_dim
    # 32 (the default PaLM's shape) and 128
    "prompt-tiles-mqa-32": ([13, 6, 1, 33], [45, 70, 9, 33], 8, 1, 32, BS),
    "prompt-tiles-gqa-8-128": ([11, 3, 1], [40, 3, 77], 16, 2, 128, BS),
}


def _batch(name: str, dtype: torch.dtype = torch.float32) -> PagedBatch:
    q_lens, ctx, heads, kv_heads, head_dim, block_size = CASES[name]
    return make_paged_batch(q_lens, ctx, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                            block_size=block_size, dtype=dtype)  # fmt: skip


def _compare(batch: PagedBatch, atol: float = FP32_ATOL) -> float:
    expected = twin_paged_attention(*batch.args(*batch.clean_caches()))
    out = torch.full_like(batch.q, float("nan"))  # a row never written stays NaN
    result = cpu_paged_attention(*batch.args(batch.k_cache, batch.v_cache), out=out)
    assert result is out
    return assert_matches(out, expected, atol)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_twin_fp32(name: str, threads: int) -> None:
    with torch_threads(threads):
        diff = _compare(_batch(name))
    print(f"{name} threads={threads}: max abs diff {diff:.3g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mixed-gqa-2", "block-size-1-two-token-chunk"])
def test_equals_twin_half(name: str, dtype: torch.dtype) -> None:
    relative = _compare(_batch(name, dtype))
    print(f"{name} {dtype}: max abs diff {relative:.3g} of max |ref|")


def _exact(batch: PagedBatch) -> torch.Tensor:
    """The definition, in fp64, one sequence at a time."""
    k_cache, v_cache = (c.double() for c in batch.clean_caches())
    starts, lens = batch.query_start_loc.tolist(), batch.context_lens.tolist()
    group = batch.q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(batch.q, dtype=torch.float64)
    for s, n in enumerate(lens):
        q = batch.q[starts[s] : starts[s + 1]].double().transpose(0, 1)  # (H, Q, D)
        table = batch.block_tables[s].long()
        k = k_cache[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(group, 0)
        v = v_cache[table].flatten(0, 1)[:n].transpose(0, 1).repeat_interleave(group, 0)
        q_pos = torch.arange(n - q.shape[1], n).unsqueeze(1)
        scores = (q @ k.transpose(1, 2) * batch.scale).masked_fill(
            torch.arange(n) > q_pos, -torch.inf
        )
        out[starts[s] : starts[s + 1]] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


def _diff_from_exact(batch: PagedBatch, threads: int) -> float:
    """The kernel's largest difference from _exact, asserted within FP32_ATOL (every row
    written: none stays NaN)."""
    out = torch.full_like(batch.q, float("nan"))
    with torch_threads(threads):
        cpu_paged_attention(*batch.args(batch.k_cache, batch.v_cache), out=out)
    assert not out.isnan().any()
    diff = (out.double() - _exact(batch)).abs().max().item()
    assert diff < FP32_ATOL
    return diff


# (query_lens, context_lens): long chunks over cached prefixes (many row tiles, causal
# within), and few long contexts (split over threads, then merged).
EXACT_CASES = {
    "long-chunk-over-prefix": ([130, 1], [400, 700]),
    "long-decodes": ([1, 1, 1], [2000, 1500, 1200]),
}


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_fp64_fp32_q_over_16bit_cache(
    name: str, cache_dtype: torch.dtype, threads: int
) -> None:
    """--kv-cache-dtype: fp32 queries over a 16-bit cache, held against the exact result over
    the values the cache holds (the twin, itself ~1e-6 from exact, is too close to referee)."""
    batch = _batch(name)
    batch = dataclasses.replace(
        batch, k_cache=batch.k_cache.to(cache_dtype), v_cache=batch.v_cache.to(cache_dtype)
    )
    diff = _diff_from_exact(batch, threads)
    print(f"{name} {cache_dtype} threads={threads}: max abs diff from exact {diff:.3g}")


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_long_inputs_equal_fp64(name: str, threads: int) -> None:
    q_lens, ctx = EXACT_CASES[name]
    batch = make_paged_batch(q_lens, ctx, heads=8, kv_heads=2, head_dim=64, block_size=BS,
                             dtype=torch.float32)  # fmt: skip
    diff = _diff_from_exact(batch, threads)
    print(f"{name} threads={threads}: max abs diff from exact {diff:.3g}")


def test_returns_new_tensor_without_out() -> None:
    batch = _batch("mixed-gqa-2")
    expected = twin_paged_attention(*batch.args(*batch.clean_caches()))
    assert_matches(cpu_paged_attention(*batch.args(batch.k_cache, batch.v_cache)), expected,
                   FP32_ATOL)  # fmt: skip


def test_strided_q() -> None:
    """q as a view of a fused projection [T, H + 2 Hkv, D], as the model could pass it."""
    batch = _batch("mixed-gqa-2")
    fused = torch.randn(batch.q.shape[0], batch.q.shape[1] + 4, batch.q.shape[2])
    fused[:, : batch.q.shape[1]] = batch.q
    args = batch.args(batch.k_cache, batch.v_cache)
    strided = cpu_paged_attention(fused[:, : batch.q.shape[1]], *args[1:])
    assert torch.equal(strided, cpu_paged_attention(*args))


def test_rejects_bad_inputs() -> None:
    batch = _batch("mixed-mqa")
    k, v = batch.clean_caches()
    args = batch.args(k, v)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_paged_attention(batch.q.transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    with pytest.raises(ValueError, match="contiguous"):
        cpu_paged_attention(*args[:2], v.transpose(0, 1).contiguous().transpose(0, 1), *args[3:])
    with pytest.raises(ValueError, match="int32"):
        cpu_paged_attention(*args[:3], batch.block_tables.long(), *args[4:])
    with pytest.raises(ValueError, match="q's dtype"):
        cpu_paged_attention(batch.q.half(), *args[1:])
    with pytest.raises(ValueError, match="q's dtype"):  # 16-bit caches only under fp32 q
        cpu_paged_attention(batch.q.half(), k.bfloat16(), v.bfloat16(), *args[3:])
    with pytest.raises(ValueError, match="the caches alike"):
        cpu_paged_attention(batch.q, k.bfloat16(), v.half(), *args[3:])
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        cpu_paged_attention(batch.q[..., :32].contiguous(), *args[1:])
    tables = batch.block_tables.clone()
    tables[0, 0] = k.shape[0]  # one past the cache: checked before anything is read
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_paged_attention(*args[:3], tables, *args[4:])


def test_traceable_without_graph_break() -> None:
    """The ops' fake implementations: opcheck's schema / fake-tensor / AOT checks, and a
    full-graph trace (aot_eager: the trace, without inductor's compile time)."""
    batch = make_paged_batch([3, 1], [20, 7], heads=4, kv_heads=2, head_dim=16, block_size=4,
                             dtype=torch.float32)  # fmt: skip
    args = batch.args(*batch.clean_caches())
    torch.library.opcheck(torch.ops.palm_cpu.paged_attention.default, args)
    out = torch.empty_like(batch.q)
    torch.library.opcheck(torch.ops.palm_cpu.paged_attention_out.default, (*args, out))
    compiled = torch.compile(cpu_paged_attention, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), cpu_paged_attention(*args))


def test_scalar_fallback_builds_and_equals_twin() -> None:
    """The build without AVX2 (CPUs that lack it), in a process of its own: it compiles
    (once; cached like the main build) and gives the twins' results: attention within 1e-6
    of the largest output (against the twin in fp64), rotary bit for bit."""
    worker = Path(__file__).parent / "cpu_scalar_worker.py"
    done = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    print(diffs)
    assert diffs["mixed"] < FP32_ATOL and diffs["head_dim_44"] < FP32_ATOL
    assert diffs["rotary"] == 0.0


@pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
    reason="this CPU has no AVX-512, so the tests above already ran the AVX2 paths",
)
def test_avx2_paths_equal_twin_where_the_cpu_has_avx512() -> None:
    """PALM_CPU_AVX512=0 keeps the kernels to their AVX2 paths (those of the CPUs without
    AVX-512): in a process of its own, the fp32 cases above pass on them too."""
    ran = 2 * (3 * len(CASES) + len(EXACT_CASES))  # at 1 and 4 threads; 2 16-bit caches
    run_on_the_avx2_paths(__file__, "equals_twin_fp32 or equal_fp64 or equals_fp64", ran)
