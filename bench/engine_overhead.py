"""The engine's own time per decode step, with the model taken out: what the scheduler, the
runner's inputs, the sampler, the scheduler's update, the core's outputs and the front's
detokenization cost around the forward (`LLMEngine.step()`, as bench/roofline.py times it).

The model (--model, the default PaLM by default) is loaded eagerly, then its forward and
logits are replaced by stand-ins that return preallocated tensors at once; --batch
sequences with --prompt-len-token prompts are prefilled (as bench/roofline.py sets them up),
then --steps greedy decode steps are timed in the CPU time of this thread (torch on one
thread; steadier than wall time on a shared machine), in --rounds rounds, each on a fresh
engine. --parts adds a round that times the parts through wrappers (which add ~1 us a call).
Decodes are planned up to num_scheduler_steps forward passes at a time, the served default
unless --scheduler-steps says otherwise (1: one pass per step); every figure is per pass (a
token for every sequence), and --steps counts passes.

To compare two commits, run it at each, alternating.

    .venv/bin/python bench/engine_overhead.py [--batch 32] [--steps 60] [--rounds 8] [--parts]
        [--scheduler-steps 4]
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

from palm_serve.engine.config import EngineConfig
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


def run_passes(engine: LLMEngine, passes: int) -> int:
    """Step engine until it has run `passes` forward passes or more; how many it ran."""
    counters = engine.core.counters
    start = counters.num_steps
    while counters.num_steps - start < passes:
        engine.step()
    return counters.num_steps - start


class _Timed:
    """A callable attribute timed into totals[part]; its other attributes are the wrapped
    object's (the sampler's argmax_rows, which the runner's passes call directly)."""

    def __init__(self, fn: Callable[..., Any], part: str, totals: dict[str, float]) -> None:
        self.fn, self.part, self.totals = fn, part, totals

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.part] += time.thread_time() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


def time_parts(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Microseconds per forward pass in each part, through wrappers around them."""
    core, runner = engine.core, engine.core.runner
    parts = ("core step (all below)", "  scheduling", "  runner (the two below, the rest)",
             "    inputs", "    sampler (or argmax alone)", "  the scheduler's update",
             "front: detokenization, outputs")  # fmt: skip
    totals = dict.fromkeys(parts, 0.0)  # printed in this order
    for obj, name, part in (
        (core, "step", parts[0]),
        (core.scheduler, "schedule", parts[1]),
        (runner, "execute", parts[2]),
        (runner, "prepare", parts[3]),
        (runner, "sampler", parts[4]),
        (core.scheduler, "update", parts[5]),
        (engine.output_processor, "process", parts[6]),
    ):
        setattr(obj, name, _Timed(getattr(obj, name), part, totals))
    # The passes' greedy path calls the sampler's argmax alone (the sampler's own call of it
    # goes to the unwrapped one).
    runner.sampler.argmax_rows = _Timed(runner.sampler.fn.argmax_rows, parts[4], totals)
    passes = run_passes(engine, steps)
    return {part: total / passes * 1e6 for part, total in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a model directory")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--parts", action="store_true", help="one more round, timing each part")
    p.add_argument(
        "--scheduler-steps",
        type=int,
        default=EngineConfig.num_scheduler_steps,
        help="most forward passes per plan (default: the served default)",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_served_model(args.model, compile=False).eval().requires_grad_(False)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    take_out_the_model(model, args.batch)
    freeze_startup_heap()  # as the served core does

    def new_engine() -> LLMEngine:
        return decoding_engine(
            model,
            tokenizer,
            args.batch,
            args.steps,
            args.prompt_len,
            num_scheduler_steps=args.scheduler_steps,
        )

    rounds = []
    for _ in range(args.rounds):
        engine = new_engine()
        t0 = time.thread_time()
        passes = run_passes(engine, args.steps)
        rounds.append((time.thread_time() - t0) / passes * 1e6)
    print(
        f"{args.model.name}, {args.batch} sequences decoding ({args.prompt_len}-token prompts, "
        f"up to {args.scheduler_steps} forward passes per plan): the engine's own CPU time per "
        "pass "
        f"{statistics.median(rounds):.0f} us (median of {args.rounds} rounds of {args.steps} "
        f"passes: {', '.join(f'{r:.0f}' for r in rounds)})"
    )
    if args.parts:
        engine = new_engine()
        for part, us in time_parts(engine, args.steps).items():
            print(f"  {part}: {us:.0f} us")


if __name__ == "__main__":
    main()
