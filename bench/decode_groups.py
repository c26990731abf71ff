"""The CPU twin's decode attention with its decodes grouped by context length, or not.

One step's worth of paged attention (a plan, then 8 layers) for B single-token decodes
whose contexts are uniform in [--min-ctx, --max-ctx], at several split costs: 10**9 keeps
one group padded to the longest context, 0 makes up to four. Compare the times in one run;
OpenMP reads its environment when torch loads, so run it once more as
`OMP_WAIT_POLICY=PASSIVE python bench/decode_groups.py` to see the server's default.

    .venv/bin/python bench/decode_groups.py [--batch 32] [--min-ctx 48] [--max-ctx 768]
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time

import torch

# The package re-exports the function under the module's name; the module holds the plan.
twin = importlib.import_module("palm_serve.kernels.paged_attention")

BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM, LAYERS = 16, 2, 8, 64, 8  # the tiny Llama's shapes
SPLIT_COSTS = (10**9, 8192, 2048, 512, 0)


def decode_batch(batch: int, low: int, high: int, seed: int = 0) -> tuple:
    rng = random.Random(seed)
    lens = [rng.randint(low, high) for _ in range(batch)]
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    total = sum(blocks) + 1
    pool = list(range(total))
    rng.shuffle(pool)
    tables = torch.zeros(batch, max(blocks), dtype=torch.int32)
    for s, n in enumerate(blocks):
        tables[s, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
    k_cache = torch.randn(total, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    v_cache = torch.randn(total, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    return torch.randn(batch, HEADS, HEAD_DIM), k_cache, v_cache, tables, starts, lens


def step_ms(batch: tuple, split_cost: int, repeats: int) -> tuple[float, int]:
    q, k_cache, v_cache, tables, starts, lens = batch
    context_lens = torch.tensor(lens, dtype=torch.int32)
    out = torch.empty_like(q)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = twin.plan_paged_attention(
            tables, starts, context_lens, BLOCK_SIZE, KV_HEADS, split_cost=split_cost
        )
        for _ in range(LAYERS):
            twin.paged_attention(
                q, k_cache, v_cache, tables, starts, context_lens, 0.125, out=out, plan=plan
            )
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3, len(plan.decode_groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-ctx", type=int, default=48)
    p.add_argument("--max-ctx", type=int, default=768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch = decode_batch(args.batch, args.min_ctx, args.max_ctx)
    print(f"{args.batch} decodes, contexts {args.min_ctx}-{args.max_ctx}, {LAYERS} layers")
    for cost in SPLIT_COSTS:  # warm-up: the first calls of a process pay its page faults
        step_ms(batch, cost, 2)
    print("| round | split_cost | groups | step ms |\n|---|---|---|---|")
    for round_ in range(args.rounds):
        # Alternate the order, so that drift within a round favours no one.
        for cost in SPLIT_COSTS if round_ % 2 == 0 else SPLIT_COSTS[::-1]:
            ms, groups = step_ms(batch, cost, args.repeats)
            print(f"| {round_ + 1} | {cost} | {groups} | {ms:.1f} |")


if __name__ == "__main__":
    main()
