"""AsyncEngine: streaming, concurrency, abort (explicit and by a vanishing consumer),
validation errors, a failing step (every caller hears of it; the engine is then dead),
shutdown, and build_engine from a model directory. asyncio.wait_for guards against hangs;
it is never a timed assertion."""

from __future__ import annotations

import asyncio
import random

import pytest

from palm_serve.engine.async_engine import AsyncEngine
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.errors import EngineDeadError, InvalidRequestError
from palm_serve.engine.factory import build_async_engine, build_engine
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.model import ByteTokenizer, save_model_dir

import engine_helpers
from engine_helpers import (
    PieceTokenizer,
    check_greedy,
    greedy,
    make_context_model,
)

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread

GUARD = 60  # seconds; only so a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def model():
    return make_context_model()


@pytest.fixture
async def engine(model):
    engine = build_async_engine(
        model, PieceTokenizer(97), EngineConfig(num_blocks=128, max_model_len=256), seed=0
    )
    await engine.start()
    yield engine
    await engine.shutdown()


def requested(engine: AsyncEngine, prompt, params, request_id=None):
    """The engine's stream of one request: tokenized and validated as the server does."""
    return engine.generate(engine.make_request(engine.tokenize(prompt), params, request_id))


async def collect(engine: AsyncEngine, prompt, params, request_id=None):
    return [out async for out in requested(engine, prompt, params, request_id)]


def core_of(engine: AsyncEngine):
    return engine.client.core  # the in-process client's EngineCore


async def idle(engine: AsyncEngine) -> None:
    """Until the worker has released everything (aborts are applied asynchronously)."""
    while core_of(engine).has_unfinished() or core_of(engine).seqs:
        await asyncio.sleep(0.01)
    assert core_of(engine).block_manager.num_free_blocks == engine.info.num_blocks


async def test_concurrent_staggered_requests_stream_and_match_the_oracle(engine, model) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(rng.randint(1, 150))] for _ in range(12)]

    async def client(i: int):
        await asyncio.sleep(0.01 * i)
        return await collect(engine, prompts[i], greedy(12))

    results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(12))), GUARD)
    for prompt, outs in zip(prompts, results, strict=True):
        # One increment per step: a token, or one per forward pass of the step.
        assert sum(len(o.new_token_ids) for o in outs) == 12
        assert all(o.new_token_ids for o in outs)
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        check_greedy(model, prompt, [t for o in outs for t in o.new_token_ids])
    stats = engine.stats()
    assert stats.num_finished == 12 and stats.num_output_tokens == 144
    await idle(engine)


async def test_abort_and_vanishing_consumer_free_the_blocks(engine) -> None:
    async def abort_after_two():
        outs = []
        async for out in requested(engine, [1, 2, 3], greedy(200), "victim"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("victim")
        return outs

    outs = await asyncio.wait_for(abort_after_two(), GUARD)
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs) < 200
    # A consumer that stops iterating (a client disconnect) aborts its request.
    stream = requested(engine, [4, 5, 6], greedy(200), "dropped")
    await asyncio.wait_for(stream.__anext__(), GUARD)
    await stream.aclose()
    await asyncio.wait_for(idle(engine), GUARD)
    assert engine.stats().num_aborted == 2


async def test_invalid_requests_fail_at_the_first_step(engine) -> None:
    cases = [
        ([], greedy(4), "prompt"),
        ([1, 2, 500], greedy(4), "prompt"),
        (list(range(90)) * 3, greedy(4), "prompt"),
        (list(range(90)) * 2, greedy(100), "max_tokens"),
        ([1, 2], greedy(4, stop_token_ids=(97,)), "stop_token_ids"),
    ]
    for prompt, params, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            await collect(engine, prompt, params)
        assert info.value.param == field
    with pytest.raises(InvalidRequestError, match=r"180 tokens.*max_tokens \(100\).*256"):
        engine.make_request(list(range(90)) * 2, greedy(100))
    # The engine still serves.
    outs = await asyncio.wait_for(collect(engine, [1, 2, 3], greedy(3)), GUARD)
    assert outs[-1].finish_reason == "length"


async def test_a_failing_step_fails_every_caller_and_kills_the_engine(engine, monkeypatch) -> None:
    runner = core_of(engine).runner
    calls = 0
    real_execute = runner.execute

    def flaky(plan, *args):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("injected kernel failure")
        return real_execute(plan, *args)

    monkeypatch.setattr(runner, "execute", flaky)
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, [i + 1] * 5, greedy(50)) for i in range(4))), GUARD
    )
    for outs in results:
        assert outs[-1].finished and outs[-1].finish_reason == "error"
        assert "injected kernel failure" in outs[-1].error
        assert len([t for o in outs for t in o.new_token_ids]) < 50
    assert not engine.healthy
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(collect(engine, [1, 2], greedy(2)), GUARD)
    assert core_of(engine).block_manager.num_free_blocks == engine.info.num_blocks


async def test_shutdown_aborts_in_flight_requests(model) -> None:
    engine = build_async_engine(model, PieceTokenizer(97), EngineConfig(num_blocks=64))
    await engine.start()
    stream = requested(engine, [1, 2, 3], greedy(300))
    first = await asyncio.wait_for(stream.__anext__(), GUARD)
    assert not first.finished
    await asyncio.wait_for(engine.shutdown(), GUARD)
    rest = await asyncio.wait_for(_drain(stream), GUARD)
    assert rest[-1].finish_reason == "abort"
    with pytest.raises(EngineDeadError):
        await collect(engine, [1], greedy(1))


async def _drain(stream):
    return [out async for out in stream]


async def test_build_engine_from_a_model_directory(tmp_path) -> None:
    model = make_context_model(vocab_size=300)
    save_model_dir(tmp_path, model.config, model.state_dict())
    engine = build_engine(tmp_path, EngineConfig(num_blocks=32), kernel_backend="torch")
    assert isinstance(engine.tokenizer, ByteTokenizer)
    info = engine.info
    assert (info.num_blocks, info.block_size, info.backend_name) == (32, 16, "torch")
    assert engine.max_model_len == 512 and info.model_config.vocab_size == 300
    await engine.start()
    try:
        params = SamplingParams(max_tokens=5, temperature=0.0)
        outs = await asyncio.wait_for(collect(engine, "hello", params), GUARD)
        check_greedy(model, list(b"hello"), [t for o in outs for t in o.new_token_ids])
        assert outs[-1].num_prompt_tokens == 5 and outs[-1].prompt_token_ids == list(b"hello")
    finally:
        await engine.shutdown()
