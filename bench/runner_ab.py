"""The engine's decode step with the working tree's ModelRunner against a git revision's, in
one process on one model (same weights, same compiled step), alternating.

The revision's engine/model_runner.py is loaded beside the working tree's and its
`prepare` and `execute` are bound onto a runner of the working tree's engine, so only the
runner differs. Each round builds a fresh engine per side, fills it with --batch sequences
of 32-token prompts and times --steps greedy decode steps (roofline.time_engine_step); the
sides alternate in order from round to round. Prints the median ms per step of each side
and each round's ratio.

    .venv/bin/python bench/runner_ab.py --model palm --batch 32 [--rev HEAD] [--rounds 6]
        [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch
from roofline import _load, decoding_engine, time_engine_step

REPO = Path(__file__).resolve().parent.parent
MODELS = {"palm": REPO / "model" / "default", "llama": REPO / "bench/.venvs/models/tiny-llama"}


def load_revision_runner(rev: str) -> types.ModuleType:
    """engine/model_runner.py at `rev`, as a module of the palm_serve.engine package."""
    source = subprocess.check_output(
        ["git", "-C", str(REPO), "show", f"{rev}:engine/model_runner.py"], text=True
    )
    name = "palm_serve.engine.model_runner_at_revision"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "palm_serve.engine"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:engine/model_runner.py", "exec"), module.__dict__)
    return module


def with_runner(revision: types.ModuleType):
    """An engine set-up that binds the revision's prepare and execute onto its runner."""

    def setup(engine) -> None:
        runner = engine.core.runner
        runner.prepare = types.MethodType(revision.ModelRunner.prepare, runner)
        runner.execute = types.MethodType(revision.ModelRunner.execute, runner)

    return setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="palm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rev", default="HEAD", help="the revision whose runner is the baseline")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    class Setup:  # what roofline's loader reads
        kernel_backend = "auto"
        no_prepack = False

    model, tokenizer = _load(MODELS[args.model], Setup, True)
    revision = load_revision_runner(args.rev)
    times: dict[str, list[float]] = {"revision": [], "tree": []}
    for r in range(args.rounds):
        for side in ("revision", "tree") if r % 2 == 0 else ("tree", "revision"):
            setup = with_runner(revision) if side == "revision" else None
            engine = decoding_engine(model, tokenizer, args.batch, args.steps, 32, setup)
            step = time_engine_step(engine, args.steps)
            times[side].append(step["step"])
    before, after = (statistics.median(times[s]) for s in ("revision", "tree"))
    ratios = [round(t / b, 3) for b, t in zip(times["revision"], times["tree"], strict=True)]
    print(
        f"{args.model}, batch {args.batch}, {args.threads} threads: {args.rev} "
        f"{before * 1e3:.2f} ms/step, working tree {after * 1e3:.2f} ms/step, "
        f"tree / {args.rev} {after / before:.3f} (rounds: {ratios})"
    )


if __name__ == "__main__":
    main()
