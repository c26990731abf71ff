"""Tensor parallelism across nodes, on one machine: rank 0 is `palm-serve serve
--tensor-parallel-size 2 --tp-local-ranks 1` (it starts no worker of its own) and rank 1 is
a separate `palm-serve tp-worker` process, both meeting at 127.0.0.1:MASTER_PORT. Greedy
tokens equal the dense oracle's (what a one-rank server serves); killing the external worker
mid-stream ends every request with an error within the collective timeout and /ready turns
503, and once the worker is started again (as its supervisor would) the server serves again.
A worker holding another model is refused at the rendezvous, on both sides, by name."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from test_core_faults import (
    assert_failed_by_the_engine,
    kill_core_under_load,
    ready_status,
    start_serve,
    wait_until,
)
from test_generate_http import (  # noqa: F401
    test_greedy_tokens_equal_the_dense_oracle,
    test_stream_reassembles_to_the_non_streaming_text,
)
from test_tensor_parallel_http import workers_of

from server_helpers import (  # noqa: F401
    children,
    free_port,
    model_dir,
    oracle,
    process_alive,
    write_model_dir,
)

RANKS = 2
TP_TIMEOUT = 10.0
SERVE_FLAGS = (
    "--tensor-parallel-size",
    str(RANKS),
    "--tp-local-ranks",
    "1",
    "--tp-timeout",
    str(TP_TIMEOUT),
)


@contextmanager
def master_at(port: int) -> Iterator[None]:
    """MASTER_ADDR / MASTER_PORT in this process's environment, which start_serve's
    `palm-serve serve` inherits."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_worker(model_dir: Path, port: int, rank: int = 1) -> subprocess.Popen:
    """`palm-serve tp-worker` for rank 0 at 127.0.0.1:port (through the environment, as a
    Kubernetes pod or a systemd unit would set it). Its stderr goes to a file: a pipe
    nobody reads would block its logging once full."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    argv = [sys.executable, "-m", "palm_serve.server.cli", "tp-worker"]
    argv += ["--rank", str(rank), "--model", str(model_dir), "--log-level", "warning"]
    log = tempfile.NamedTemporaryFile("w+", prefix="tp-worker-", suffix=".log")  # noqa: SIM115
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen) -> str:
    """A worker's stderr, after it exits (killed if it has not within 30 s)."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def drain(proc: subprocess.Popen) -> None:
    """Read the server's pipes (start_serve's) from now on: its core's tracebacks after a
    few restarts would otherwise fill them and block its logging, and so its steps."""
    for pipe in (proc.stdout, proc.stderr):
        threading.Thread(target=pipe.read, daemon=True).start()


@dataclass
class TwoNodes:
    proc: subprocess.Popen
    url: str
    core_pid: int
    port: int
    model_dir: Path
    workers: list[subprocess.Popen] = field(default_factory=list)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[TwoNodes]:
    port = free_port()
    worker = start_worker(model_dir, port)
    try:
        with master_at(port):
            proc, url, core = start_serve(model_dir, *SERVE_FLAGS, "--engine-restart-backoff", "1")
    except BaseException:
        worker.kill()
        raise
    drain(proc)
    nodes = TwoNodes(proc, url, core, port, model_dir, [worker])
    try:
        yield nodes
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        for w in nodes.workers:
            if w.poll() is None:
                w.kill()
            stop(w)


def test_the_core_starts_no_worker_of_its_own(server):
    assert workers_of(server.core_pid) == []
    assert server.workers[0].poll() is None


def test_a_killed_external_worker_fails_the_requests_then_its_restart_serves(server, oracle):
    """Runs after the server's other tests: it restarts the core."""
    worker = server.workers[0]
    streams, plain, ended = asyncio.run(
        kill_core_under_load(server, kill=worker.kill, within=TP_TIMEOUT)
    )
    assert ended < TP_TIMEOUT
    assert_failed_by_the_engine(streams, plain)
    # The core failed and its successor waits at the rendezvous: not ready until rank 1 is.
    assert ready_status(server) == 503
    wait_until(lambda: not process_alive(server.core_pid), 30, "the failed core to exit")
    assert ready_status(server) == 503
    server.workers.append(start_worker(server.model_dir, server.port))
    wait_until(lambda: ready_status(server) == 200, 120, "/ready 200 with the new worker")
    assert_serves_greedy(server, oracle)


def test_a_killed_core_ends_the_worker_which_rejoins_the_restarted_core(server, oracle):
    """After the worker's restart above: now rank 0 fails. The worker exits 1 saying why (its
    supervisor's cue); started again, it meets the core the front restarted."""
    worker, core = server.workers[-1], core_of(server)
    os.kill(core, signal.SIGKILL)
    err = stop(worker)
    assert worker.returncode == 1
    assert "rank 1 stops:" in err, err[-2000:]
    assert ready_status(server) == 503
    server.workers.append(start_worker(server.model_dir, server.port))
    wait_until(lambda: ready_status(server) == 200, 120, "/ready 200 with the new worker")
    assert core_of(server) != core
    assert_serves_greedy(server, oracle)


def test_a_normal_stop_of_the_server_stops_the_worker_with_0(server):
    """Runs last among the server's tests: SIGTERM to the front, whose core tells its workers
    STOP on the way out; the worker exits 0 (no failure for its supervisor to report)."""
    worker = server.workers[-1]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    log = stop(worker)
    assert worker.returncode == 0, log[-3000:]


def assert_serves_greedy(server: TwoNodes, oracle) -> None:
    probe = {"prompt": "after the restart", "max_tokens": 16, "temperature": 0}
    answer = httpx.post(f"{server.url}/v1/generate", json=probe, timeout=60).json()
    assert answer["token_ids"] == oracle.greedy(probe["prompt"], 16)


def core_of(server: TwoNodes) -> int:
    """The front's engine core process (a multiprocessing spawn child, not its resource
    tracker)."""
    cores = []
    for pid in children(server.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                cores.append(pid)
    assert len(cores) == 1, cores
    return cores[0]


def test_a_worker_with_another_model_is_refused_on_both_sides(model_dir, tmp_path):
    port = free_port()
    worker = start_worker(write_model_dir(tmp_path / "other", seed=1), port)
    argv = [sys.executable, "-m", "palm_serve.server.cli", "serve", "--model", str(model_dir)]
    argv += ["--port", str(free_port()), "--device", "cpu", "--kernel-backend", "torch"]
    argv += ["--num-kv-blocks", "64", "--engine-threads", "1", *SERVE_FLAGS]
    with master_at(port):
        serve = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 1
    assert "rank 1's model differs from rank 0's" in serve.stderr, serve.stderr[-2000:]
    worker_err = stop(worker)
    assert worker.returncode == 1
    assert "rank 0's model differs from rank 1's" in worker_err, worker_err[-2000:]


def test_external_ranks_without_a_master_port_are_refused_naming_it(model_dir, capsys, monkeypatch):
    from palm_serve.server.cli import main

    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["serve", "--model", str(model_dir), *SERVE_FLAGS]) == 2
    assert "MASTER_PORT" in capsys.readouterr().err
    assert main(["tp-worker", "--rank", "1", "--model", "m"]) == 2
    assert "--master-port (or MASTER_PORT)" in capsys.readouterr().err


def test_more_local_ranks_than_ranks_is_refused_naming_the_flag(capsys):
    from palm_serve.server.cli import main

    assert main(["serve", "--tensor-parallel-size", "2", "--tp-local-ranks", "3"]) == 2
    assert "--tp-local-ranks (3) must be <= --tensor-parallel-size (2)" in capsys.readouterr().err
