"""`palm-serve serve --tensor-parallel-size 2` (a subprocess: the front, the engine core
as rank 0, one worker process; gloo) passes a representative selection of the HTTP
black-box tests, imported here so that they run against this module's `server` (their
greedy tokens and logprobs are the dense oracle's, as a one-rank server's are; the whole
suite runs against tensor parallelism with PALM_TEST_TENSOR_PARALLEL_SIZE=2); and a worker
killed mid-stream ends every request with an error within the collective timeout, then the
core and its workers restart."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from subprocess import Popen

import httpx
import pytest
from test_concurrency import test_disconnected_clients_are_aborted_and_free_their_blocks  # noqa: F401
from test_core_faults import (
    assert_failed_by_the_engine,
    kill_core_under_load,
    ready_status,
    start_serve,
    wait_until,
)
from test_generate_http import (  # noqa: F401
    test_greedy_tokens_equal_the_dense_oracle,
    test_logprobs_equal_the_dense_log_softmax,
    test_seeded_sampling_equals_a_reference_sampler,
    test_stream_reassembles_to_the_non_streaming_text,
)
from test_openai_client import (  # noqa: F401
    client,
    test_chat_equals_completion_of_the_template,
    test_chat_stream,
    test_completion_equals_our_generate,
    test_completion_stream_with_usage,
    test_echo_logprobs_score_the_prompt,
)

from server_helpers import children, model_dir, oracle, process_alive  # noqa: F401

RANKS = 2
# The collectives' timeout: the bound a request must end within when a worker dies.
TP_TIMEOUT = 10.0
WORKER_MODULE = b"palm_serve.engine.tp_worker"


@dataclass
class ServeProcess:
    proc: Popen
    url: str
    core_pid: int


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[ServeProcess]:
    flags = ["--tensor-parallel-size", str(RANKS), "--tp-timeout", str(TP_TIMEOUT)]
    proc, url, core = start_serve(model_dir, *flags, "--engine-restart-backoff", "3")
    try:
        yield ServeProcess(proc, url, core)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def workers_of(core: int) -> list[int]:
    found = []
    for pid in children(core):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if WORKER_MODULE in f.read():
                    found.append(pid)
        except FileNotFoundError:
            continue
    return found


def test_the_core_runs_one_worker_per_extra_rank(server):
    assert len(workers_of(server.core_pid)) == RANKS - 1


def test_a_killed_worker_fails_the_requests_then_the_core_restarts(server, oracle):
    """Runs last in this module: it restarts the core."""
    worker = workers_of(server.core_pid)[0]
    streams, plain, ended = asyncio.run(
        kill_core_under_load(
            server, kill=lambda: os.kill(worker, signal.SIGKILL), within=TP_TIMEOUT
        )
    )
    assert ended < TP_TIMEOUT
    assert_failed_by_the_engine(streams, plain)
    assert ready_status(server) == 503  # within the restart's backoff
    wait_until(lambda: ready_status(server) == 200, 120, "/ready 200 after the restart")
    assert not process_alive(server.core_pid) and not process_alive(worker)
    cores = [pid for pid in children(server.proc.pid) if workers_of(pid)]
    assert len(cores) == 1 and len(workers_of(cores[0])) == RANKS - 1
    probe = {"prompt": "after the restart", "max_tokens": 16, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/generate", json=probe, timeout=60).json()
    assert answer["token_ids"] == oracle.greedy(probe["prompt"], 16)


def test_tensor_parallelism_without_the_engine_process_is_refused_naming_the_flag(capsys):
    from palm_serve.server.cli import main

    code = main(["serve", "--no-engine-process", "--tensor-parallel-size", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel-size" in err and "drop --no-engine-process" in err
