"""ProcessCoreClient: the engine core in a process of its own (vLLM v1's EngineCoreClient
over ZMQ). The front never shares an interpreter, a GIL or a core's OpenMP pool with the
model: the core steps at its own pace and the event loop only encodes, sends and decodes.

Transport: two ZMQ PUSH/PULL pairs over ipc:// sockets in a private temporary directory,
one pair per core process ("generation"), so nothing queued for a dead core can reach its
successor. Each side's PULL binds and its PUSH connects: a connecting PUSH queues messages
until the peer is there, so nothing sent right after the handshake is lost. The messages
are the seam's dataclasses, msgpack-encoded (core_codec.py). The core is started with the
spawn method (no fork of a process that holds threads and an event loop) and builds the
model itself from the model directory.

Life cycle: launch() spawns the first core and waits for its CoreReady (before the event
loop runs, so the front knows the pool and context sizes before it serves). The event
loop then reads one EngineCoreOutputs per step. The core's death is seen through the
process sentinel (any exit: a crash, SIGKILL, the OOM killer) or its CoreFailed message:
on_death(message, restarting) is called once, the front ends every in-flight request, and
a new core is started after a backoff, up to `restarts` times over the front's life;
on_revival() when it is ready. shutdown() asks the core to stop and kills it if it does not
within a few seconds."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import zmq
import zmq.asyncio

from ..model.tokenizer import load_tokenizer
from ..model.weights import load_config
from .async_engine import AsyncEngine, EngineInfo
from .core_client import OnDeath, OnOutputs, OnRevival
from .core_codec import CoreCodec, CoreFailed, CoreReady, FromCore, Shutdown, ToCore
from .core_main import CoreLink, CoreSpec, run_core_process
from .errors import EngineError
from .messages import EngineCoreOutputs, EngineCoreRequest, FinishRequests

logger = logging.getLogger(__name__)

# After the process exits, messages it sent just before (its last outputs, CoreFailed)
# get this long to be read before its death is declared.
EXIT_GRACE_SECONDS = 0.05
# A core asked to shut down gets this long to exit before it is killed.
SHUTDOWN_SECONDS = 5.0
BACKOFF_LIMIT_SECONDS = 60.0
_POLL_MS = 100


class CoreStartError(EngineError):
    """A core process did not come up (it failed to build, died or timed out)."""


@dataclass(frozen=True)
class CoreProcessOptions:
    """How the front runs its core processes (the spec says what each one builds)."""

    # Core restarts allowed over the front's life after a core died (0: never restart).
    restarts: int = 3
    # Seconds before the first restart; doubled for each later one.
    restart_backoff: float = 1.0
    # Seconds a core may take to load its model and answer the handshake.
    start_timeout: float = 600.0
    # Set in the core's environment before it imports torch (OMP_WAIT_POLICY etc.).
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Generation:
    """One core process and the sockets that reach it."""

    number: int
    process: BaseProcess
    to_core: zmq.Socket[bytes]
    # The socket's owner, read on the event loop once the core is ready (before that,
    # through a blocking shadow: blocking()).
    from_core: zmq.asyncio.Socket
    ready: CoreReady | None = None
    reader: asyncio.Task[None] | None = None
    exited: bool = False
    lost: bool = False

    def blocking(self) -> zmq.Socket[bytes]:
        """A blocking view of from_core (a shadow: it never closes the socket itself)."""
        return zmq.Socket.shadow(self.from_core.underlying)

    def close(self) -> None:
        self.to_core.close(linger=0)
        # Closed through its owner, the asyncio socket, which also unregisters it from the
        # loop. (Had a blocking owner lent it to an asyncio shadow that closed it, the
        # owner would close it again when collected: by then the handle may be a later
        # generation's socket, which then never receives, a restart or two later.)
        self.from_core.close(linger=0)


class ProcessCoreClient:
    def __init__(self, spec: CoreSpec, options: CoreProcessOptions | None = None) -> None:
        self.spec = spec
        self.options = options or CoreProcessOptions()
        self._codec = CoreCodec()
        self._zmq = zmq.Context(io_threads=1)
        self._dir = tempfile.mkdtemp(prefix="palm-serve-")
        self._mp = multiprocessing.get_context("spawn")
        self._gen: _Generation | None = None
        self._first: CoreReady | None = None
        self._count = 0
        self._attempts = 0
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_outputs: OnOutputs | None = None
        self._on_death: OnDeath | None = None
        self._on_revival: OnRevival | None = None

    @property
    def pid(self) -> int | None:
        """The serving core's process id (None while none serves)."""
        gen = self._gen
        if gen is None or gen.ready is None or gen.lost or gen.exited:
            return None
        return gen.ready.pid

    # ---- CoreClient --------------------------------------------------------------------

    def launch(self) -> CoreReady:
        """Start the first core and wait until it is ready. Blocking: call it before the
        event loop serves (the front needs the pool and context sizes to validate)."""
        if self._first is not None:
            return self._first
        gen = self._spawn()
        try:
            gen.ready = self._wait_ready(gen)
        except BaseException:
            self._discard(gen)
            raise
        self._gen, self._first = gen, gen.ready
        return gen.ready

    async def start(self, on_outputs: OnOutputs, on_death: OnDeath, on_revival: OnRevival) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_outputs, self._on_death, self._on_revival = on_outputs, on_death, on_revival
        self.launch()
        assert self._gen is not None
        self._watch(self._gen)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(request)

    def finish_requests(self, message: FinishRequests) -> None:
        self._send(message)

    async def shutdown(self) -> None:
        """Stop the core (Shutdown, then SIGKILL if it lingers) and remove the sockets."""
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._restart_task
        gen, self._gen = self._gen, None
        if gen is not None:
            await self._stop(gen)
        self.close()

    def close(self) -> None:
        """Release the ZMQ context and the sockets' directory (after shutdown(), or after
        a launch() that failed: the client is then unusable)."""
        self._zmq.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- one generation ----------------------------------------------------------------

    def _spawn(self) -> _Generation:
        """Open a generation's sockets and start its process. Call it from a thread that
        lives as long as the front (the main or event-loop thread): Linux ties the core's
        death signal to the spawning thread, not to the process."""
        self._count += 1
        n = self._count
        link = CoreLink(
            input_address=f"ipc://{self._dir}/to-core-{n}",
            output_address=f"ipc://{self._dir}/from-core-{n}",
            parent_pid=os.getpid(),
        )
        to_core, from_core = open_sockets(self._zmq, link)
        # daemon: multiprocessing's exit handler stops it if the front exits without
        # shutting it down (an error before the server ran).
        process = self._mp.Process(
            target=run_core_process,
            args=(self.spec, link),
            name=f"palm-serve-core-{n}",
            daemon=True,
        )
        with environment(self.options.environment):
            process.start()
        if self.spec.cpus is not None and process.pid is not None:
            # The core pins itself too; pinning it now also covers its start-up imports.
            with suppress(OSError, AttributeError):
                os.sched_setaffinity(process.pid, self.spec.cpus)
        return _Generation(n, process, to_core, from_core)

    def _wait_ready(self, gen: _Generation) -> CoreReady:
        deadline = time.monotonic() + self.options.start_timeout
        while time.monotonic() < deadline:
            socket = gen.blocking()
            if socket.poll(_POLL_MS):
                return self._handshake(socket.recv_multipart())
            self._check_alive(gen)
        raise self._timed_out()

    async def _wait_ready_async(self, gen: _Generation) -> CoreReady:
        socket, deadline = gen.from_core, time.monotonic() + self.options.start_timeout
        while time.monotonic() < deadline:
            if await socket.poll(_POLL_MS):
                return self._handshake(await socket.recv_multipart())
            self._check_alive(gen)
        raise self._timed_out()

    def _handshake(self, frames: list[bytes]) -> CoreReady:
        message = self._codec.decode_from_core(frames)
        if isinstance(message, CoreReady):
            return message
        if isinstance(message, CoreFailed):
            raise CoreStartError(f"the engine core failed to start: {message.message}")
        raise CoreStartError(f"the engine core sent {type(message).__name__} before CoreReady")

    @staticmethod
    def _check_alive(gen: _Generation) -> None:
        if not gen.process.is_alive():
            raise CoreStartError(
                f"the engine core exited while starting ({describe_exit(gen.process)})"
            )

    def _timed_out(self) -> CoreStartError:
        return CoreStartError(
            f"the engine core was not ready within {self.options.start_timeout:.0f} s"
        )

    def _watch(self, gen: _Generation) -> None:
        loop = self._loop
        assert loop is not None
        gen.reader = loop.create_task(self._read(gen), name=f"palm-serve-core-{gen.number}")
        loop.add_reader(gen.process.sentinel, self._on_exit, gen)

    async def _read(self, gen: _Generation) -> None:
        socket = gen.from_core
        while True:
            frames = await socket.recv_multipart()
            try:
                message: FromCore = self._codec.decode_from_core(frames)
            except ValueError:
                logger.exception("undecodable message from the engine core")
                self._lost(gen, "the engine core sent an undecodable message")
                return
            if isinstance(message, EngineCoreOutputs):
                if self._on_outputs is not None:
                    self._on_outputs(message)
            elif isinstance(message, CoreFailed):
                self._lost(gen, message.message)
                return

    def _on_exit(self, gen: _Generation) -> None:
        """The process ended (the sentinel fd turned readable)."""
        assert self._loop is not None
        self._loop.remove_reader(gen.process.sentinel)
        gen.exited = True
        self._loop.call_later(EXIT_GRACE_SECONDS, self._lost, gen, None)

    def _lost(self, gen: _Generation, message: str | None) -> None:
        """The core stopped serving: tell the front (once), then restart it if allowed.
        message None: its process exited (the exit status says how)."""
        if gen.lost or self._stopping:
            return
        gen.lost = True
        if message is None:
            # The sentinel can turn readable a moment before the exit status exists.
            gen.process.join(SHUTDOWN_SECONDS)
            message = f"the engine core process died ({describe_exit(gen.process)})"
        if self._loop is not None:
            self._loop.remove_reader(gen.process.sentinel)
        if gen.reader is not None and gen.reader is not asyncio.current_task():
            gen.reader.cancel()
        if self._gen is gen:
            self._gen = None
        self._discard(gen)
        restarting = self._attempts < self.options.restarts
        logger.error("%s; %s", message, "restarting it" if restarting else "no restart left")
        if self._on_death is not None:
            self._on_death(message, restarting)
        if restarting and self._loop is not None:
            self._restart_task = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        while self._attempts < self.options.restarts:
            delay = min(self.options.restart_backoff * 2**self._attempts, BACKOFF_LIMIT_SECONDS)
            self._attempts += 1
            await asyncio.sleep(delay)
            gen = self._spawn()
            try:
                gen.ready = await self._wait_ready_async(gen)
                self._check_same(gen.ready)
            except (CoreStartError, ValueError) as exc:
                logger.error("engine core restart %d failed: %s", self._attempts, exc)
                self._discard(gen)
                continue
            except asyncio.CancelledError:  # shutdown() while it started
                self._discard(gen)
                raise
            self._gen = gen
            self._watch(gen)
            logger.warning("engine core restarted (pid %d)", gen.ready.pid)
            if self._on_revival is not None:
                self._on_revival()
            return
        logger.error("the engine core stays down: %d restart(s) used", self.options.restarts)
        if self._on_death is not None:
            self._on_death("the engine core died and could not be restarted", False)

    def _check_same(self, ready: CoreReady) -> None:
        """The front validates requests against the first core's sizes: a successor must
        have the same (it builds from the same directory and settings)."""
        first = self._first
        assert first is not None
        ours = (ready.max_model_len, ready.num_blocks, ready.block_size)
        if ours != (first.max_model_len, first.num_blocks, first.block_size):
            raise ValueError(f"the restarted core differs from the first: {ready} / {first}")

    async def _stop(self, gen: _Generation) -> None:
        gen.lost = True
        if self._loop is not None:
            self._loop.remove_reader(gen.process.sentinel)
        if gen.reader is not None:
            gen.reader.cancel()
        if not gen.exited:
            self._send_to(gen, Shutdown())
        await asyncio.to_thread(gen.process.join, SHUTDOWN_SECONDS)
        if gen.process.is_alive():
            logger.warning("the engine core did not stop in %.0f s: killing it", SHUTDOWN_SECONDS)
        self._discard(gen)

    def _discard(self, gen: _Generation) -> None:
        """The generation's process gone (killed if need be), its sockets closed."""
        if gen.process.is_alive():
            gen.process.kill()
        gen.process.join(SHUTDOWN_SECONDS)
        gen.close()

    # ---- sending -----------------------------------------------------------------------

    def _send(self, message: ToCore) -> None:
        gen = self._gen
        if gen is None or gen.lost or gen.exited:
            return  # the front ends (or has ended) every request that core had
        self._send_to(gen, message)

    def _send_to(self, gen: _Generation, message: ToCore) -> None:
        try:
            gen.to_core.send_multipart(self._codec.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("could not send %s to the engine core: %s", type(message).__name__, exc)


def open_sockets(
    context: zmq.Context[zmq.Socket[bytes]], link: CoreLink
) -> tuple[zmq.Socket[bytes], zmq.asyncio.Socket]:
    """A generation's two sockets (to its core, from it), the front's end of `link`."""
    from_core = zmq.asyncio.Socket(context, zmq.PULL)
    from_core.bind(link.output_address)
    to_core = context.socket(zmq.PUSH)
    to_core.setsockopt(zmq.SNDHWM, 0)  # queue until the core reads; never drop or block
    to_core.connect(link.input_address)
    return to_core, from_core


def build_process_engine(spec: CoreSpec, options: CoreProcessOptions | None = None) -> AsyncEngine:
    """An AsyncEngine whose core runs in a process of its own, built there from
    spec.model_dir. Returns once that core is ready (CoreStartError if it cannot start)."""
    client = ProcessCoreClient(spec, options)
    # The model's config is read here from the same directory; the handshake carries what
    # the core computed from it (pool and context sizes, kernels, threads).
    config = load_config(spec.model_dir)
    tokenizer = load_tokenizer(spec.model_dir, config.vocab_size)
    try:
        ready = client.launch()
    except BaseException:
        client.close()
        raise
    info = EngineInfo(
        model_config=config,
        max_model_len=ready.max_model_len,
        num_blocks=ready.num_blocks,
        block_size=ready.block_size,
        backend_name=ready.backend_name,
        core_pid=ready.pid,
        num_threads=ready.num_threads,
        cpus=tuple(ready.cpus),
        decode_threads=spec.engine_config.decode_threads,
        weight_bytes=ready.weight_bytes,
    )
    return AsyncEngine(client, tokenizer, info)


def describe_exit(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set while a core is spawned: the child copies the
    environment at its start, and OpenMP reads its settings when torch loads there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
