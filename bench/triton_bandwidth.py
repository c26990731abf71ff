"""Achieved memory bandwidth of the Triton kernels, against the device's copy bandwidth.

Each kernel is timed with triton.testing.do_bench (median) at serving sizes: decodes of
batch 1-256 over contexts 128-8192 (paged attention, with the split-K policy's choice and
with splitting off), rotary and the cache write on 256-4096 tokens, and one mixed step (a
512-token prefill chunk over a 1024-token prefix with 64 decodes), and the weight-only
int8 linear against cuBLAS on the same weight in fp16 (M = 1-256 rows, the tiny Llama's
and a 7B Llama's shapes; GB/s counts the weight bytes read). head_dim 64 and 128,
8 and 32 query heads over one K/V head, fp16, block_size 16. GB/s counts the bytes a kernel
must move at least (K/V read once, q and out once), so it is comparable with the copy.

    .venv/bin/python bench/triton_bandwidth.py [--dtype float16|bfloat16] [--quick]

Without a CUDA device it says so and exits 0 (the kernels are verified on the CPU by the
interpreted and AOT-compile tests in tests/kernels/)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

import torch

BLOCK_SIZE = 16
MAX_CACHE_BYTES = 4 << 30  # skip shapes whose K/V cache would not fit comfortably


def median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """The device's measured device-to-device copy bandwidth (read + write), GB/s."""
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6


def paged_batch(q_lens: list[int], ctx_lens: list[int], heads: int, head_dim: int, dtype):
    """Random q and a paged K/V cache with shuffled block tables, on CUDA."""
    n_blocks = [-(-c // BLOCK_SIZE) for c in ctx_lens]
    total = sum(n_blocks)
    shape = (total, BLOCK_SIZE, 1, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    order = torch.randperm(total, device="cuda", dtype=torch.int32)
    tables = torch.zeros(len(ctx_lens), max(n_blocks), dtype=torch.int32, device="cuda")
    start = 0
    for s, n in enumerate(n_blocks):
        tables[s, :n] = order[start : start + n]
        start += n
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype, device="cuda")
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, qsl.cuda(), ctx


def bench_attention(q_lens, ctx_lens, heads, head_dim, dtype, peak: float, label: str) -> None:
    from palm_serve.kernels.triton import paged_attention

    pa = importlib.import_module("palm_serve.kernels.triton.paged_attention")
    cache_bytes = 2 * sum(ctx_lens) * head_dim * dtype.itemsize
    if cache_bytes > MAX_CACHE_BYTES:
        return
    q, k_cache, v_cache, tables, qsl, ctx = paged_batch(q_lens, ctx_lens, heads, head_dim, dtype)
    out = torch.empty_like(q)
    moved = cache_bytes + 2 * q.numel() * dtype.itemsize
    splits = pa.plan_launch(q, k_cache, tables, len(ctx_lens)).num_splits
    args = (q, k_cache, v_cache, tables, qsl, ctx, head_dim**-0.5)
    ms = median_ms(lambda: paged_attention(*args, out=out))
    ms_one = median_ms(lambda: paged_attention(*args, out=out, num_splits=1))
    print(
        f"attention {label:<28} H={heads:<2} D={head_dim:<3} splits={splits:<2} "
        f"{ms * 1e3:9.1f} us {moved / ms / 1e6:7.0f} GB/s ({100 * moved / ms / 1e6 / peak:5.1f}%)"
        f" | no split {ms_one * 1e3:9.1f} us {moved / ms_one / 1e6:7.0f} GB/s"
    )


def bench_rotary_and_write(tokens: int, heads: int, head_dim: int, dtype, peak: float) -> None:
    from palm_serve.kernels import build_cos_sin_cache
    from palm_serve.kernels.triton import rotary_embedding, write_kv_cache

    q = torch.randn(tokens, heads, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(tokens, 1, head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    cos_sin = build_cos_sin_cache(head_dim, 8192).cuda()
    ms = median_ms(lambda: rotary_embedding(q, k, positions, cos_sin))
    moved = 2 * (q.numel() + k.numel()) * dtype.itemsize
    print(f"rotary    T={tokens:<5} H={heads:<2} D={head_dim:<3} {ms * 1e3:9.1f} us "
          f"{moved / ms / 1e6:7.0f} GB/s ({100 * moved / ms / 1e6 / peak:5.1f}%)")  # fmt: skip
    n_blocks = -(-tokens // BLOCK_SIZE)
    k_cache = torch.empty(n_blocks, BLOCK_SIZE, 1, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(n_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    ms = median_ms(lambda: write_kv_cache(k, v, k_cache, v_cache, slots))
    moved = 4 * k.numel() * dtype.itemsize
    print(f"write_kv  T={tokens:<5}      D={head_dim:<3} {ms * 1e3:9.1f} us "
          f"{moved / ms / 1e6:7.0f} GB/s ({100 * moved / ms / 1e6 / peak:5.1f}%)")  # fmt: skip


INT8_SHAPES = ((512, 2816), (1408, 512), (4096, 4096), (4096, 22016), (11008, 4096))  # (K, N)


def bench_int8_linear(rows: int, k: int, n: int, dtype, peak: float) -> None:
    from palm_serve.kernels.triton import triton_int8_matmul

    matmul = triton_int8_matmul()
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scales = torch.rand(n, device="cuda") * 0.01
    packed, packed_scales = matmul.pack(weight, scales)
    dense = (weight.to(dtype) * scales.to(dtype)[:, None]).contiguous()
    x = torch.randn(rows, k, dtype=dtype, device="cuda")
    ms = median_ms(lambda: matmul.linear(x, packed, packed_scales, n))
    ms_dense = median_ms(lambda: x @ dense.T)
    print(f"int8_linear M={rows:<4} K={k:<5} N={n:<5} {ms * 1e3:8.1f} us "
          f"{k * n / ms / 1e6:6.0f} GB/s ({100 * k * n / ms / 1e6 / peak:5.1f}%) | "
          f"cuBLAS {dtype} {ms_dense * 1e3:8.1f} us: int8 / fp16 {ms / ms_dense:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/triton_bandwidth.py: no CUDA device here; the Triton kernels need a GPU.")
        return 0
    dtype = getattr(torch, args.dtype)
    peak = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {peak:.0f} GB/s, {args.dtype}")
    for k, n in INT8_SHAPES[:3] if args.quick else INT8_SHAPES:
        for rows in (1, 16, 256) if args.quick else (1, 4, 16, 64, 256):
            bench_int8_linear(rows, k, n, dtype, peak)
    batches = (1, 16, 256) if args.quick else (1, 4, 16, 64, 256)
    contexts = (1024,) if args.quick else (128, 1024, 8192)
    for head_dim in (64, 128):
        for heads in (8, 32):
            for batch in batches:
                for ctx in contexts:
                    bench_attention([1] * batch, [ctx] * batch, heads, head_dim, dtype, peak,
                                    f"decode B={batch} ctx={ctx}")  # fmt: skip
            mixed_q, mixed_ctx = [512] + [1] * 64, [1536] + [1024] * 64
            bench_attention(mixed_q, mixed_ctx, heads, head_dim, dtype, peak,
                            "mixed 512@1024 + 64 decodes")  # fmt: skip
            for tokens in (256, 4096):
                bench_rotary_and_write(tokens, heads, head_dim, dtype, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
