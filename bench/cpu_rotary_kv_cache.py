"""The compiled rotary embedding + KV-cache write against the torch twins, per layer call.

As the model calls them (kernels' signatures, q and k made contiguous first): the twins;
the compiled ops one after the other; and the fused op on the strided q / k / v views of
the projection (no copies). For 32 decode tokens and a 512-token prompt, with the shapes of
the tiny Llama (8 heads, 2 K/V heads, head_dim 64) and of the default PaLM (8 heads, MQA,
head_dim 32). Medians of --repeats calls, best of --rounds rounds of alternating order.

    .venv/bin/python bench/cpu_rotary_kv_cache.py [--threads 2] [--repeats 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from palm_serve.kernels import build_cos_sin_cache, cpu, rotary_embedding, write_kv_cache

SHAPES = {"tiny-llama": (8, 2, 64), "palm-default": (8, 1, 32)}  # heads, kv_heads, head_dim
MAX_POS, NUM_SLOTS = 2048, 4096


def make_inputs(tokens: int, shape: tuple[int, int, int]) -> dict:
    heads, kv_heads, head_dim = shape
    return dict(
        fused=torch.randn(tokens, heads + 2 * kv_heads, head_dim),  # the projection's q|k|v
        heads=heads,
        kv_heads=kv_heads,
        caches=[torch.zeros(NUM_SLOTS // 16, 16, kv_heads, head_dim) for _ in range(2)],
        positions=torch.randint(0, MAX_POS, (tokens,)),
        slots=torch.randperm(NUM_SLOTS)[:tokens],
        cos_sin=build_cos_sin_cache(head_dim, MAX_POS),
    )


def _views(x: dict) -> tuple[torch.Tensor, ...]:
    h, kv = x["heads"], x["kv_heads"]
    f = x["fused"]
    return f[:, :h], f[:, h : h + kv], f[:, h + kv :]


def calls(x: dict) -> dict[str, Callable[[], None]]:
    k_cache, v_cache = x["caches"]

    def separately(rotary, write) -> Callable[[], None]:
        def call() -> None:
            q, k, v = _views(x)
            q, k = q.contiguous(), k.contiguous()
            rotary(q, k, x["positions"], x["cos_sin"], None)
            write(k, v.contiguous(), k_cache, v_cache, x["slots"])

        return call

    def fused() -> None:
        q, k, v = _views(x)
        cpu.rotary_write_kv_cache(
            q, k, v, k_cache, v_cache, x["positions"], x["slots"], x["cos_sin"], None
        )

    return {
        "twins": separately(rotary_embedding, write_kv_cache),
        "cpu ops": separately(cpu.rotary_embedding, cpu.write_kv_cache),
        "cpu fused": fused,
    }


def median_us(call: Callable[[], None], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the CPU kernels did not build: {cpu.unavailable_reason()}")
    print(f"{args.threads} threads; us per layer call (median of {args.repeats}, best of "
          f"{args.rounds} rounds)")  # fmt: skip
    print("| shapes | tokens | twins us | cpu ops us | cpu fused us | twins / fused |")
    print("|---|---|---|---|---|---|")
    for shape_name, shape in SHAPES.items():
        for tokens in (32, 512):
            fns = calls(make_inputs(tokens, shape))
            best = {name: float("inf") for name in fns}
            for round_ in range(args.rounds):
                for name in list(fns) if round_ % 2 == 0 else list(fns)[::-1]:
                    fns[name]()  # warm-up
                    best[name] = min(best[name], median_us(fns[name], args.repeats))
            t, o, f = best["twins"], best["cpu ops"], best["cpu fused"]
            print(f"| {shape_name} | {tokens} | {t:.1f} | {o:.1f} | {f:.1f} | {t / f:.1f}x |")


if __name__ == "__main__":
    main()
