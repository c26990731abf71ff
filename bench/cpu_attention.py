"""The compiled CPU paged attention against the torch twin, per layer call.

Batches: 32 decodes with contexts uniform in [48, 768]; a mixed step (two 256-token prefill
chunks, one of them over a 256-token cached prefix, and 30 such decodes); one 512-token
prompt. Shapes of the tiny Llama (8 heads, 2 K/V heads, head_dim 64) and of the default
PaLM (8 heads, MQA, head_dim 32); block size 16. The twin's per-step plan is built once per
step of --layers calls and its cost shared among them, as in the model. Medians of
--repeats steps, in --rounds rounds of alternating order.

--distinct-caches gives each layer call caches of its own, as the layers of a step have: the
caches then come from memory, not from L3, as in a served step at long contexts.

--kv-cache-dtype bfloat16 (or float16) also times the kernel over the same caches in that
dtype (fp32 queries, as `palm-serve serve --kv-cache-dtype` runs it), alternated with the
others.

On a machine that other processes share, wall time measures the scheduler as much as the
kernels (an OpenMP region waits for its slowest thread, and the twin runs many regions a
call); with --threads 1, --clock thread measures the CPU time of the one thread instead.

    .venv/bin/python bench/cpu_attention.py [--threads 2] [--repeats 20] [--rounds 3]
        [--clock wall|thread] [--kv-cache-dtype bfloat16] [--distinct-caches]
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time
from collections.abc import Callable

import torch

from palm_serve.kernels import cpu

twin = importlib.import_module("palm_serve.kernels.paged_attention")

BLOCK_SIZE = 16
SHAPES = {"tiny-llama": (8, 2, 64), "palm-default": (8, 1, 32)}  # heads, kv_heads, head_dim


def make_batch(q_lens: list[int], lens: list[int], shape: tuple[int, int, int], seed: int = 0):
    heads, kv_heads, head_dim = shape
    rng = random.Random(seed)
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    pool = list(range(sum(blocks)))
    rng.shuffle(pool)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    for s, n in enumerate(blocks):
        tables[s, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
    cache_shape = (sum(blocks), BLOCK_SIZE, kv_heads, head_dim)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return (
        torch.randn(sum(q_lens), heads, head_dim),
        torch.randn(cache_shape),
        torch.randn(cache_shape),
        tables,
        starts,
        torch.tensor(lens, dtype=torch.int32),
        head_dim**-0.5,
    )


def batches(shape: tuple[int, int, int]) -> dict[str, tuple]:
    rng = random.Random(0)
    decodes = [rng.randint(48, 768) for _ in range(32)]
    mixed_q, mixed_ctx = [256, 256] + [1] * 30, [256, 512] + decodes[:30]
    return {
        "32 decodes": make_batch([1] * 32, decodes, shape),
        "2 chunks + 30 decodes": make_batch(mixed_q, mixed_ctx, shape),
        "512-token prompt": make_batch([512], [512], shape),
    }


def twin_step(batch: tuple, layers: int) -> Callable[[], None]:
    q, k_cache, v_cache, tables, starts, lens, scale = batch
    out = torch.empty_like(q)

    def step() -> None:
        plan = twin.plan_paged_attention(tables, starts, lens, BLOCK_SIZE, k_cache.shape[2])
        for _ in range(layers):
            twin.paged_attention(q, k_cache, v_cache, tables, starts, lens, scale, out, plan)

    return step


def cpu_step(batch: tuple, layers: int, distinct_caches: bool = False) -> Callable[[], None]:
    out = torch.empty_like(batch[0])
    q, k_cache, v_cache, *rest = batch
    per_layer = [batch] * layers
    if distinct_caches:
        per_layer = [
            (q, torch.randn_like(k_cache, dtype=torch.float).to(k_cache.dtype),
             torch.randn_like(v_cache, dtype=torch.float).to(v_cache.dtype), *rest)
            for _ in range(layers)
        ]  # fmt: skip

    def step() -> None:
        for layer in per_layer:
            cpu.paged_attention(*layer, out=out)

    return step


def median_ms(step: Callable[[], None], repeats: int, layers: int, clock) -> float:
    samples = []
    for _ in range(repeats):
        t0 = clock()
        step()
        samples.append(clock() - t0)
    return statistics.median(samples) * 1e3 / layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall")
    p.add_argument("--kv-cache-dtype", choices=["bfloat16", "float16"])
    p.add_argument("--distinct-caches", action="store_true", help="caches of its own per layer")
    args = p.parse_args()
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the CPU kernels did not build: {cpu.unavailable_reason()}")
    print(
        f"{args.threads} threads, {args.clock} clock; ms per layer call (median of "
        f"{args.repeats} steps of {args.layers} layers, best of {args.rounds} rounds)"
    )
    kv = args.kv_cache_dtype
    extra = f" cpu, {kv} cache ms | fp32 cache / {kv} cache |" if kv else ""
    print(f"| shapes | batch | twin ms | cpu ms | twin / cpu |{extra}")
    print("|---|---|---|---|---|" + ("---|---|" if kv else ""))
    for shape_name, shape in SHAPES.items():
        for batch_name, batch in batches(shape).items():
            steps = {
                "twin": twin_step(batch, args.layers),
                "cpu": cpu_step(batch, args.layers, args.distinct_caches),
            }
            if kv:
                q, k_cache, v_cache, *rest = batch
                cache_dtype = getattr(torch, kv)
                half = (q, k_cache.to(cache_dtype), v_cache.to(cache_dtype), *rest)
                steps[kv] = cpu_step(half, args.layers, args.distinct_caches)
            for step in steps.values():  # warm-up: first calls pay page faults, the build
                step()
            best = {name: float("inf") for name in steps}
            for round_ in range(args.rounds):
                order = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
                for name in order:
                    best[name] = min(
                        best[name], median_ms(steps[name], args.repeats, args.layers, clock)
                    )
            ratio = best["twin"] / best["cpu"]
            cells = f" {best[kv]:.3f} | {best['cpu'] / best[kv]:.2f}x |" if kv else ""
            print(f"| {shape_name} | {batch_name} | {best['twin']:.3f} | {best['cpu']:.3f} | "
                  f"{ratio:.1f}x |{cells}")  # fmt: skip


if __name__ == "__main__":
    main()
