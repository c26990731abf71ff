"""CoreClient: how the front reaches the engine core. Requests and finish messages go in;
each step's EngineCoreOutputs come back on the event loop, through a callback.

InProcessCoreClient runs the core's step loop in a worker thread of this process (tests,
embedding). The served default runs it in a process of its own, which the client restarts
when it dies (core_process.py: ProcessCoreClient)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Protocol

from .core import EngineCore
from .messages import EngineCoreOutputs, EngineCoreRequest, FinishRequests

logger = logging.getLogger(__name__)

OnOutputs = Callable[[EngineCoreOutputs], None]
# (why the core stopped serving, whether a new core is being started)
OnDeath = Callable[[str, bool], None]
# A new core serves after a death (its pool and prefix cache are fresh).
OnRevival = Callable[[], None]


class CoreClient(Protocol):
    async def start(self, on_outputs: OnOutputs, on_death: OnDeath, on_revival: OnRevival) -> None:
        """Start the core; from then on its outputs, its death and its replacement by a new
        core are reported through the callbacks, called on the running event loop."""
        ...

    def add_request(self, request: EngineCoreRequest) -> None: ...

    def finish_requests(self, message: FinishRequests) -> None: ...

    async def shutdown(self) -> None:
        """Stop the core; requests it still runs are dropped (the front ends them)."""
        ...


class InProcessCoreClient:
    """The core's loop in one worker thread: it sleeps on a condition while idle, applies
    the messages that arrived, steps, and hands the outputs to the event loop.

    If a step raises, the core does not try to recover (its state after an arbitrary
    exception, e.g. a half-written KV cache, cannot be trusted): the pool is released and
    on_death is told why."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._cond = threading.Condition()
        self._inbox: list[EngineCoreRequest | FinishRequests] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_outputs: OnOutputs | None = None
        self._on_death: OnDeath | None = None

    async def start(self, on_outputs: OnOutputs, on_death: OnDeath, on_revival: OnRevival) -> None:
        # A failed step is final here: nothing restarts a thread, so on_revival never comes.
        self._loop = asyncio.get_running_loop()
        self._on_outputs, self._on_death = on_outputs, on_death
        self._thread = threading.Thread(target=self._run, name="palm-serve-core", daemon=True)
        self._thread.start()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(request)

    def finish_requests(self, message: FinishRequests) -> None:
        self._send(message)

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _send(self, message: EngineCoreRequest | FinishRequests) -> None:
        with self._cond:
            self._inbox.append(message)
            self._cond.notify()

    def _message_waiting(self) -> bool:
        # Without the lock: a stale answer only moves the end of a step's passes by one.
        return bool(self._inbox) or self._stopping

    def _run(self) -> None:
        core = self.core
        while True:
            with self._cond:
                while not (self._inbox or self._stopping or core.has_unfinished()):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                if self._stopping:
                    core.finish_all("abort")
                    return
            try:
                for message in inbox:
                    apply_message(core, message)
                outputs = core.step(self._message_waiting) if core.has_unfinished() else []
                self._publish(self._on_outputs, EngineCoreOutputs(outputs, core.stats()))
            except Exception as exc:  # noqa: BLE001 - any failure ends the core, see class doc
                logger.exception("engine step failed; failing all requests")
                self._die(f"engine step failed: {type(exc).__name__}: {exc}")
                return

    def _die(self, message: str) -> None:
        try:
            self.core.finish_all("error", message)
        except Exception:  # noqa: BLE001 - the front must still hear of it
            logger.exception("cleanup after the failed step failed too")
        self._publish(self._on_death, message, False)

    def _publish(self, callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


def apply_message(core: EngineCore, message: EngineCoreRequest | FinishRequests) -> None:
    if isinstance(message, EngineCoreRequest):
        core.add_request(message)
    else:
        core.finish_requests(message.request_ids, message.reason)
