"""bench/engine_overhead.py on a tiny random model: the stand-in model decodes every
sequence the whole way (each engine step still schedules, samples and detokenizes all of
them), and the parts it reports are the engine's. Speed is not checked (benchmarks measure
it; tests never time anything)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "server"))

from engine_overhead import take_out_the_model, time_parts  # noqa: E402
from roofline import decoding_engine  # noqa: E402

from palm_serve.engine.factory import load_served_model  # noqa: E402
from palm_serve.model import load_tokenizer  # noqa: E402

from server_helpers import write_model_dir  # noqa: E402


@pytest.mark.parametrize("passes", [1, 8])
def test_every_sequence_decodes_through_the_stand_in_model(tmp_path: Path, passes: int) -> None:
    model_dir = write_model_dir(tmp_path / "tiny")
    model = load_served_model(model_dir).eval().requires_grad_(False)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    take_out_the_model(model, batch=5)
    steps = 4
    engine = decoding_engine(
        model, tokenizer, batch=5, steps=steps, prompt_len=7, num_scheduler_steps=passes
    )
    running = engine.core.scheduler.running
    assert len(running) == 5 and not engine.core.scheduler.waiting
    # The prefill's token, then two decode steps' (a token per pass run: up to `passes`).
    (generated,) = {seq.num_output_tokens for seq in running}
    assert 3 <= generated <= 1 + 2 * passes
    before = engine.core.counters.num_steps
    parts = time_parts(engine, steps)
    ran = engine.core.counters.num_steps - before
    assert steps <= ran < steps + passes
    assert all(seq.num_output_tokens == generated + ran for seq in running)
    assert set(parts) >= {"core step (all below)", "  scheduling", "    sampler (or argmax alone)"}
    assert all(us > 0 for us in parts.values())
