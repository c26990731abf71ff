"""Tensor parallelism on this machine: model-step throughput of the tiny benchmark Llama
(bench/make_tiny_llama.py's shape, random weights) split over 2 ranks (gloo, this process
and one worker, one thread each) against one rank with one and with two threads.

Two steps, as the engine runs them: a decode batch (BATCH sequences of CONTEXT tokens,
one new token each, logits for all) and a prefill (one prompt of PREFILL tokens, logits of
its last row). The three set-ups alternate within each round (A/B/C interleaved, so load
from other work hits them alike); each figure is the median over rounds of a round's
median step time. Eager on every side (torch.compile is off under tensor parallelism).

    .venv/bin/python bench/tensor_parallel.py [--rounds 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from make_tiny_llama import SHAPE

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import load_served_model
from palm_serve.engine.tp_launch import RankSpec, rendezvous_address, start_tensor_parallel
from palm_serve.model import AttentionMetadata, KVCache

BATCH, CONTEXT, PREFILL, BLOCK = 16, 128, 256, 16
POOL_BLOCKS = BATCH * (CONTEXT // BLOCK + 1) + PREFILL // BLOCK


def write_model(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path, safe_serialization=True)
    return path


def batch(
    q_lens: list[int], contexts: list[int]
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    per_seq = -(-max(contexts) // BLOCK)
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(len(contexts))]
    meta = AttentionMetadata.build(tables, q_lens, contexts, BLOCK)
    positions = [p for q, n in zip(q_lens, contexts, strict=True) for p in range(n - q, n)]
    ids = torch.randint(0, SHAPE["vocab_size"], (len(positions),))
    return ids, torch.tensor(positions), meta


def step_timer(model: torch.nn.Module, threads: int) -> dict[str, Callable[[], float]]:
    """name -> a function that runs one step and returns its seconds."""
    cache = KVCache.allocate(model.config, POOL_BLOCKS, BLOCK)
    steps = {
        "decode": batch([1] * BATCH, [CONTEXT] * BATCH),
        "prefill": batch([PREFILL], [PREFILL]),
    }

    def timer(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> float:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        with torch.inference_mode():
            hidden = model(ids, positions, cache, meta)
            model.compute_logits(hidden[meta.last_token_indices()])
        return time.perf_counter() - started

    return {name: (lambda s=s: timer(*s)) for name, s in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "tiny-llama")
        one = load_served_model(model_dir, kernel_backend="auto", prepack_cpu_linears=True)
        spec = RankSpec(
            rank=0,
            world=2,
            address=rendezvous_address(),
            model_dir=str(model_dir),
            dtype="float32",
            device="cpu",
            kernel_backend="auto",
            prepack_cpu_linears=True,
            timeout=60.0,
            start_timeout=600.0,
            cpus=None,
            engine_config=EngineConfig(block_size=BLOCK, num_blocks=POOL_BLOCKS),
        )
        two = start_tensor_parallel(spec)
        setups = {
            "1 rank, 1 thread": step_timer(one, 1),
            "1 rank, 2 threads": step_timer(one, 2),
            "2 ranks, 1 thread each": step_timer(two, 1),
        }
        medians: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for setup, steps in setups.items():
                for name, run in steps.items():
                    run()  # warm
                    times = [run() for _ in range(args.steps)]
                    medians.setdefault((setup, name), []).append(statistics.median(times))
        two.close()
        dist.destroy_process_group()
    tokens = {"decode": BATCH, "prefill": PREFILL}
    base = {name: statistics.median(medians[("1 rank, 1 thread", name)]) for name in tokens}
    print(f"{'set-up':26} {'step':8} {'median ms':>10} {'tokens/s':>9} {'vs 1 rank 1 thread':>19}")
    for (setup, name), values in medians.items():
        t = statistics.median(values)
        print(f"{setup:26} {name:8} {t * 1e3:10.2f} {tokens[name] / t:9.0f} {base[name] / t:19.2f}")


if __name__ == "__main__":
    main()
