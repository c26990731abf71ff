"""Helpers of the HTTP tests: a tiny random model on disk, a real uvicorn server on
127.0.0.1 (a free port) in a background thread, its engine core in a process of its own
as `palm-serve serve` runs it, the dense no-cache greedy oracle, and the Prometheus text
parser."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from palm_serve.model import load_model, load_tokenizer, save_model_dir
from palm_serve.server.app import create_app
from palm_serve.server.http_protocol import uvicorn_config
from palm_serve.server.placement import available_cpus
from palm_serve.server.serve import load_engine
from palm_serve.server.settings import Settings

from conftest import make_config, make_model

# Bytes 0-255 plus id 256 = EOS: the ByteTokenizer fallback (no tokenizer.json).
VOCAB = 257
STARTUP_SECONDS = 60
# PALM_TEST_TENSOR_PARALLEL_SIZE=2: every test server (with an engine process) splits its
# model over 2 ranks, to run the whole HTTP suite against tensor parallelism.
TEST_TENSOR_PARALLEL_SIZE = int(os.environ.get("PALM_TEST_TENSOR_PARALLEL_SIZE", "1"))
# PALM_TEST_ENGINE_PROCESS=0: test servers run their engine core in a thread instead of a
# process of its own (a test that asks for one still gets it). For the front's mutation runs
# (mutation/server.cfg): a server then starts in a fraction of a second, not seconds.
TEST_ENGINE_PROCESS = os.environ.get("PALM_TEST_ENGINE_PROCESS", "1") != "0"


def write_model_dir(path: Path, max_positions: int = 512, seed: int = 0) -> Path:
    # emb_std=1.0: well separated logits, so greedy choices never hinge on float rounding.
    config = make_config(vocab_size=VOCAB, max_positions=max_positions)
    model = make_model(config, emb_std=1.0, seed=seed)
    save_model_dir(path, model.config, model.state_dict())
    return path


def settings_for(model_dir: Path, **overrides) -> Settings:
    values = dict(
        model=model_dir,
        device="cpu",
        kernel_backend="torch",
        num_kv_blocks=1024,
        max_tokens_limit=512,
        log_level="warning",
        # Tiny model: one thread is fastest, and the core may use any CPU of this shared
        # machine (its workers then sleep between parallel regions).
        engine_threads=1,
        engine_cpus=",".join(map(str, available_cpus())),
    )
    if not TEST_ENGINE_PROCESS:
        values["engine_process"] = False
        del values["engine_cpus"]  # a placement of the core's process: there is none
    engine_process = overrides.get("engine_process", values.get("engine_process", True))
    if TEST_TENSOR_PARALLEL_SIZE > 1 and engine_process:
        values["tensor_parallel_size"] = TEST_TENSOR_PARALLEL_SIZE
    values.update(overrides)
    return Settings(**values)


class ServerThread:
    """The real app (engine from the model directory, as `palm-serve serve` builds it) under
    a real uvicorn server, on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = load_engine(settings)
        self.app = create_app(settings, self.engine)
        config = uvicorn_config(
            self.app,
            settings.header_read_timeout,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self):
        return self.app.state.palm

    def run(self, coro):
        """Run a coroutine on the server's event loop (e.g. to stop the engine)."""
        loop = self.server.servers[0].get_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)


@contextmanager
def running_server(model_dir: Path, **overrides) -> Iterator[ServerThread]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, and the machine is shared
    try:
        with ServerThread(settings_for(model_dir, **overrides)) as server:
            yield server
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    with running_server(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


class Oracle:
    """The same weights, run by the dense no-cache forward: what greedy must produce."""

    def __init__(self, model_dir: Path) -> None:
        self.model = load_model(model_dir)
        self.tokenizer = load_tokenizer(model_dir, VOCAB)

    @torch.no_grad()
    def greedy(self, prompt: str | list[int], n: int) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        out: list[int] = []
        for _ in range(n):
            logits = self.model.forward_dense(torch.tensor([ids + out]))[0, -1]
            out.append(int(logits.argmax()))
        return out

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: row t is log p(. | ids[:t+1])."""
        return torch.log_softmax(self.model.forward_dense(torch.tensor([ids]))[0].float(), -1)


def process_alive(pid: int) -> bool:
    """Running or sleeping; an exited process (gone, or a zombie nobody reaped) is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (the core, multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the Prometheus text format."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
