"""ProcessCoreClient with real core processes: the seam's messages survive the codec, a
core process serves the dense oracle's greedy tokens, a step that raises in the core ends
its requests with the core's own message and the core is restarted, restarts run out,
and shutdown stops the process cleanly. asyncio.wait_for only guards against hangs."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from palm_serve.engine.async_engine import AsyncEngine
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.core_codec import CoreCodec, CoreFailed, CoreReady, Shutdown
from palm_serve.engine.core_main import CoreLink, CoreSpec
from palm_serve.engine.core_process import (
    CoreProcessOptions,
    _Generation,
    build_process_engine,
    open_sockets,
)
from palm_serve.engine.errors import EngineDeadError
from palm_serve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishRequests,
)
from palm_serve.engine.outputs import TokenLogprob
from palm_serve.engine.sampling_params import SamplingParams, StructuredOutputSpec
from palm_serve.engine.stats import EngineStats
from palm_serve.model import save_model_dir

from engine_helpers import check_greedy, greedy, make_context_model

GUARD = 60  # seconds; only so a hang fails the test instead of blocking the suite


def test_every_seam_message_survives_the_codec():
    codec = CoreCodec()
    params = SamplingParams(max_tokens=3, stop=("x",), stop_token_ids=(5,), seed=9, logprobs=2)
    lp = TokenLogprob(4, -0.5, [(4, -0.5), (7, -1.25)])
    constrained = SamplingParams(
        structured_output=StructuredOutputSpec(choice=("a", "b")), temperature=0.5
    )
    to_core = [
        EngineCoreRequest("r1", [1, 2, 3], params, 12.5),
        EngineCoreRequest("r2", [1], constrained, 1.0),
        FinishRequests(["r1", "r2"], "stop"),
        Shutdown(),
    ]
    from_core = [
        CoreReady(
            pid=7,
            max_model_len=512,
            num_blocks=8,
            block_size=16,
            backend_name="torch",
            num_threads=1,
            cpus=[1],
        ),
        EngineCoreOutputs(
            [
                EngineCoreOutput("r1", [4], "stop", 4, None, [lp], [None, lp], 16, 3.0),
                EngineCoreOutput("r2", [5], "stop", grammar_complete=True),
            ],
            EngineStats(num_running=1, kv_cache_usage=0.25, num_steps=3),
        ),
        CoreFailed("engine step failed: boom"),
    ]
    assert [codec.decode_to_core(codec.encode(m)) for m in to_core] == to_core
    assert [codec.decode_from_core(codec.encode(m)) for m in from_core] == from_core
    with pytest.raises(ValueError):
        codec.decode_to_core(codec.encode(from_core[0]))  # wrong direction
    with pytest.raises(ValueError):
        codec.decode_from_core([b"o", b"\xc1"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = make_context_model(vocab_size=300)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model_dir(path, model.config, model.state_dict())
    return path


def spec(model_dir: Path) -> CoreSpec:
    return CoreSpec(
        model_dir=str(model_dir),
        engine_config=EngineConfig(num_blocks=64),
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        prepack_cpu_linears=False,
        compile=False,
        seed=0,
        threads=1,
        cpus=None,
    )


async def started(model_dir: Path, restarts: int) -> AsyncEngine:
    options = CoreProcessOptions(restarts=restarts, restart_backoff=0.0)
    engine = await asyncio.to_thread(build_process_engine, spec(model_dir), options)
    await engine.start()
    return engine


async def generate(engine: AsyncEngine, prompt: list[int], params: SamplingParams):
    request = engine.make_request(prompt, params)
    return await asyncio.wait_for(_collect(engine.generate(request)), GUARD)


async def _collect(stream):
    return [out async for out in stream]


async def until(condition, what: str) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), GUARD)
    except TimeoutError:
        pytest.fail(f"no {what} within {GUARD} s")


async def test_a_failing_step_ends_its_requests_and_the_core_is_restarted(model_dir):
    engine = await started(model_dir, restarts=1)
    try:
        pid = engine.client.pid
        model = make_context_model(vocab_size=300)
        outs = await generate(engine, [5, 6, 7], greedy(6))
        check_greedy(model, [5, 6, 7], [t for o in outs for t in o.new_token_ids])

        # An id past the vocabulary (the front would refuse it) makes the core's step raise.
        victim = engine.make_request([1, 2], greedy(400))
        stream = engine.generate(victim)
        first = await asyncio.wait_for(stream.__anext__(), GUARD)
        engine.client.add_request(EngineCoreRequest("bad", [10**6], greedy(1), 0.0))
        rest = await asyncio.wait_for(_collect(stream), GUARD)
        last = ([first] + rest)[-1]
        assert last.finish_reason == "error" and "engine step failed" in last.error
        assert engine.status == "restarting"
        with pytest.raises(EngineDeadError, match="restarting"):
            await generate(engine, [1], greedy(1))

        await until(lambda: engine.status == "ready", "the restart")
        assert engine.num_restarts == 1 and engine.client.pid not in (None, pid)
        again = await generate(engine, [5, 6, 7], greedy(6))
        assert [t for o in again for t in o.new_token_ids] == [
            t for o in outs for t in o.new_token_ids
        ]

        os.kill(engine.client.pid, signal.SIGKILL)  # no restart left
        await until(lambda: engine.status == "dead", "the second death")
        with pytest.raises(EngineDeadError):
            await generate(engine, [1], greedy(1))
    finally:
        await asyncio.wait_for(engine.shutdown(), GUARD)


async def test_shutdown_stops_the_core_and_removes_its_sockets(model_dir):
    engine = await started(model_dir, restarts=3)
    client = engine.client
    stream = engine.generate(engine.make_request([3, 4], greedy(250)))
    await asyncio.wait_for(stream.__anext__(), GUARD)
    process = client._gen.process
    await asyncio.wait_for(engine.shutdown(), GUARD)
    rest = await asyncio.wait_for(_collect(stream), GUARD)
    assert rest[-1].finish_reason == "abort"
    assert process.exitcode == 0  # it stopped when told to; nothing killed it
    assert not os.path.exists(client._dir)
    assert engine.status == "stopped" and engine.num_restarts == 0


def test_a_closed_generations_socket_never_closes_a_later_ones(tmp_path):
    """Regression: the reply socket was owned by a blocking socket and closed through an
    asyncio shadow; collected later, the owner closed its handle again, by then reused by a
    later generation's socket (zmq frees a closed socket shortly after), whose replies then
    never came."""
    context = zmq.Context()

    def generation(n: int) -> _Generation:
        link = CoreLink(f"ipc://{tmp_path}/to-{n}", f"ipc://{tmp_path}/from-{n}", os.getpid())
        return _Generation(n, None, *open_sockets(context, link))  # type: ignore[arg-type]

    first = generation(1)
    first.blocking().poll(1)  # used, as the launch's handshake uses it
    first.close()
    time.sleep(0.5)  # zmq's reaper frees the closed socket: the next one may take its place
    second = generation(2)
    del first
    gc.collect()
    second.blocking().poll(1)  # ZMQError if the first generation closed this socket
    second.close()
    context.term()
