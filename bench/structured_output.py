"""What structured output costs per decode step: the default model, B sequences decoding
sampled JSON under a schema (llguidance fills the step's bitmask, the sampler applies it)
against B unconstrained sampled sequences, in the same invocation.

Each run builds a fresh engine, admits B requests at once, and times `LLMEngine.step()`
only while all B are decoding (a constrained request that completes its JSON early would
shrink the batch). The two kinds alternate run by run (A, B, A, B, ...) so that load from
other processes hits both alike; a cell is the median over runs of each run's median step.
The constrained step is also split into its two additions: filling the bitmask
(StructuredOutputManager.bitmask) and applying it (apply_token_bitmask in the sampler).

    .venv/bin/python bench/structured_output.py [--batches 1 32] [--runs 7] [--steps 24]
        [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import palm_serve.engine.sampler as sampler_module
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine, load_served_model
from palm_serve.engine.llm_engine import LLMEngine
from palm_serve.engine.sampling_params import SamplingParams, StructuredOutputSpec
from palm_serve.model import load_tokenizer

MODEL_DIR = Path(__file__).resolve().parent.parent / "model" / "default"
# Long outputs (up to eight verses), so that a batch stays whole for --steps steps.
SCHEMA = {
    "type": "object",
    "properties": {
        "book": {"enum": ["Genesis", "Exodus", "Psalms", "John"]},
        "chapter": {"type": "integer", "minimum": 1, "maximum": 150},
        "verses": {
            "type": "array",
            "items": {"type": "string", "minLength": 20, "maxLength": 80},
            "minItems": 4,
            "maxItems": 8,
        },
    },
    "required": ["book", "chapter", "verses"],
    "additionalProperties": False,
}
PROMPTS = ["And the LORD said unto Moses, ", "In the beginning ", "Blessed are the "]


class Timer:
    """Adds up the wall time of calls to obj.name (a method or a module function)."""

    def __init__(self, obj: object, name: str) -> None:
        self.obj, self.name, self.fn = obj, name, getattr(obj, name)
        self.total = 0.0
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t0

    def restore(self) -> None:
        setattr(self.obj, self.name, self.fn)


def one_run(model, tokenizer, batch: int, constrained: bool, steps: int, seed: int) -> dict:
    config = EngineConfig(num_blocks=1024, max_num_seqs=max(batch, 1))
    engine = build_llm_engine(model, tokenizer, config, seed=0)
    spec = StructuredOutputSpec(json_schema=json.dumps(SCHEMA)) if constrained else None
    for i in range(batch):
        # Unconstrained: no EOS, so the batch stays whole; constrained: EOS only where the
        # JSON is complete, which the schema puts past --steps tokens.
        params = SamplingParams(
            max_tokens=256,
            temperature=1.0,
            seed=seed * 1000 + i,
            ignore_eos=not constrained,
            structured_output=spec,
        )
        engine.add_request(f"r{i}", tokenizer.encode(PROMPTS[i % 3]), params)
    while engine.core.scheduler.waiting:  # every prompt prefilled; then decode steps only
        engine.step()
    engine.step()
    return timed_steps(engine, batch, steps)


def timed_steps(engine: LLMEngine, batch: int, steps: int) -> dict:
    fill = Timer(engine.core.structured, "bitmask")
    apply = Timer(sampler_module, "apply_token_bitmask")
    samples = []
    try:
        while len(samples) < steps and len(engine.core.scheduler.running) == batch:
            t0 = time.perf_counter()
            engine.step()
            samples.append(time.perf_counter() - t0)
    finally:
        fill.restore()
        apply.restore()
    n = max(len(samples), 1)
    return {
        "step": statistics.median(samples) if samples else float("nan"),
        "fill": fill.total / n,
        "apply": apply.total / n,
        "steps": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_served_model(MODEL_DIR, prepack_cpu_linears=True)
    tokenizer = load_tokenizer(MODEL_DIR, model.config.vocab_size)
    one_run(model, tokenizer, 1, True, 2, seed=999)  # warm-up: llguidance's tokenizer, caches
    rows = []
    for batch in args.batches:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.runs):
            for constrained in (False, True):  # interleaved: A, B, A, B, ...
                runs[constrained].append(
                    one_run(model, tokenizer, batch, constrained, args.steps, seed=r)
                )
        plain = statistics.median(x["step"] for x in runs[False])
        masked = statistics.median(x["step"] for x in runs[True])
        row = {
            "batch": batch,
            "plain_ms": plain * 1e3,
            "constrained_ms": masked * 1e3,
            "ratio": masked / plain,
            "fill_ms": statistics.median(x["fill"] for x in runs[True]) * 1e3,
            "apply_ms": statistics.median(x["apply"] for x in runs[True]) * 1e3,
            "min_steps": min(x["steps"] for x in runs[True] + runs[False]),
        }
        rows.append(row)
        print(
            f"batch {batch:3d}: unconstrained {row['plain_ms']:.2f} ms/step, constrained "
            f"{row['constrained_ms']:.2f} ms/step (x{row['ratio']:.2f}); bitmask fill "
            f"{row['fill_ms']:.3f} ms, apply {row['apply_ms']:.3f} ms; >= {row['min_steps']} "
            f"steps per run, {args.runs} runs each",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "rows": rows}))


if __name__ == "__main__":
    main()
