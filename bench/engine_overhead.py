"""The engine's own time per decode step, with the model taken out: what the scheduler, the
runner's inputs, the sampler, the scheduler's update, the core's outputs and the front's
detokenization cost around the forward (`LLMEngine.step()`, as bench/roofline.py times it).

The model (--model, the default PaLM by default) is loaded eagerly, then its forward and
logits are replaced by stand-ins that return preallocated tensors at once; --batch
sequences with --prompt-len-token prompts are prefilled (as bench/roofline.py sets them up),
then --steps greedy decode steps are timed in the CPU time of this thread (torch on one
thread; steadier than wall time on a shared machine), in --rounds rounds, each on a fresh
engine. --parts adds a round that times the parts through wrappers (which add ~1 us a call).

To compare two commits, run it at each, alternating.

    .venv/bin/python bench/engine_overhead.py [--batch 32] [--steps 60] [--rounds 8] [--parts]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from roofline import decoding_engine

from palm_serve.engine.factory import load_served_model
from palm_serve.engine.heap import freeze_startup_heap
from palm_serve.engine.llm_engine import LLMEngine
from palm_serve.model import load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model" / "default"


def take_out_the_model(model: Any, batch: int) -> None:
    """Replace model's forward and logits with stand-ins that return preallocated tensors
    (zero hidden states, fixed random logits) at once, for batches of up to `batch` rows."""
    hidden = torch.zeros(batch, model.config.dim)
    logits = torch.randn(batch, model.config.vocab_size, generator=torch.Generator())

    def forward(input_ids: torch.Tensor, *_: Any) -> torch.Tensor:
        n = input_ids.shape[0]
        return hidden[:n] if n <= batch else torch.zeros(n, model.config.dim)

    model.forward = forward
    model.compute_logits = lambda rows: logits[: rows.shape[0]]


def time_parts(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Microseconds per step in each part, through wrappers around them."""
    totals: dict[str, float] = {}

    def wrap(obj: object, name: str, part: str) -> None:
        fn: Callable[..., Any] = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[part] = totals.get(part, 0.0) + time.thread_time() - t0

        setattr(obj, name, timed)

    core, runner = engine.core, engine.core.runner
    parts = ("core step (all below)", "  scheduling", "  runner (the two below, the rest)",
             "    inputs", "    sampler", "  the scheduler's update",
             "front: detokenization, outputs")  # fmt: skip
    totals.update(dict.fromkeys(parts, 0.0))  # printed in this order
    wrap(core, "step", "core step (all below)")
    wrap(core.scheduler, "schedule", "  scheduling")
    wrap(runner, "execute", "  runner (the two below, the rest)")
    wrap(runner, "prepare", "    inputs")
    wrap(runner, "sampler", "    sampler")
    wrap(core.scheduler, "update", "  the scheduler's update")
    wrap(engine.output_processor, "process", "front: detokenization, outputs")
    for _ in range(steps):
        engine.step()
    return {part: total / steps * 1e6 for part, total in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a model directory")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--parts", action="store_true", help="one more round, timing each part")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_served_model(args.model, compile=False).eval().requires_grad_(False)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    take_out_the_model(model, args.batch)
    freeze_startup_heap()  # as the served core does
    rounds = []
    for _ in range(args.rounds):
        engine = decoding_engine(model, tokenizer, args.batch, args.steps, args.prompt_len)
        t0 = time.thread_time()
        for _ in range(args.steps):
            engine.step()
        rounds.append((time.thread_time() - t0) / args.steps * 1e6)
    print(
        f"{args.model.name}, {args.batch} sequences decoding ({args.prompt_len}-token prompts): "
        f"the engine's own CPU time per step {statistics.median(rounds):.0f} us (median of "
        f"{args.rounds} rounds of {args.steps} steps: {', '.join(f'{r:.0f}' for r in rounds)})"
    )
    if args.parts:
        engine = decoding_engine(model, tokenizer, args.batch, args.steps, args.prompt_len)
        for part, us in time_parts(engine, args.steps).items():
            print(f"  {part}: {us:.0f} us")


if __name__ == "__main__":
    main()
