"""AsyncEngine: the asyncio front of the engine, the only thing the server talks to.

The synchronous LLMEngine runs in one worker thread; the event loop never waits on the
model. Requests and aborts reach the worker through a command list guarded by a
condition (the worker sleeps on it when idle); outputs come back through
loop.call_soon_threadsafe into one asyncio.Queue per request.

If a step raises, the engine does not try to recover: every in-flight and queued
request gets a final output with finish_reason "error" and the message, `healthy`
turns False, and later generate() calls raise EngineDeadError. (The model's state after
an arbitrary exception, e.g. a half-written KV cache, cannot be trusted.)"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..model.tokenizer import Tokenizer
from .config import EngineConfig
from .errors import EngineDeadError, InvalidRequestError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .stats import EngineStats
from .validation import validate_request

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_config: Any, backend_name: str = "torch") -> None:
        self.engine = engine
        self.tokenizer: Tokenizer = engine.tokenizer
        self.model_config = model_config
        self.max_model_len = engine.max_model_len
        self.num_blocks = engine.block_manager.num_blocks
        self.block_size = engine.block_manager.block_size
        self.backend_name = backend_name
        self._cond = threading.Condition()
        self._commands: list[tuple] = []  # ("add", id, ids, params, time) | ("abort", id)
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None  # why the engine cannot serve, once it cannot

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Tokenizer,
        engine_config: EngineConfig | None = None,
        *,
        seed: int | None = None,
        backend_name: str | None = None,
    ) -> AsyncEngine:
        """An engine over an in-memory model (tests, benchmarks)."""
        from .factory import build_llm_engine

        engine = build_llm_engine(model, tokenizer, engine_config or EngineConfig(), seed=seed)
        name = backend_name or getattr(getattr(model, "kernels", None), "name", "torch")
        return cls(engine, model.config, name)

    # ---- life cycle --------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._dead is None

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="palm-serve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop; unfinished requests end with finish_reason "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._dead = self._dead or "the engine is shut down"

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- requests ----------------------------------------------------------------------

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return validate_request(
            prompt, params, self.tokenizer, self.model_config.vocab_size, self.max_model_len
        )

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come (increments); the last has finished=True.
        Stopping early (aclose, cancellation) aborts the request."""
        prompt_ids = self.validate(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._cond:
            if self._thread is None:
                raise EngineDeadError("the engine is not started (await engine.start())")
            if self._dead is not None or self._stopping:
                raise EngineDeadError(self._dead or "the engine is shutting down")
            if request_id in self._queues:
                raise InvalidRequestError(
                    f"request_id {request_id!r} is already in use", "request_id"
                )
            self._queues[request_id] = queue
            self._commands.append(("add", request_id, prompt_ids, params, time.monotonic()))
            self._cond.notify()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._submit(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, command: tuple) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- the worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._commands or self._stopping or self.engine.has_unfinished()):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            if stopping:
                self._publish(
                    self._unserved(commands, "abort", None) + self.engine.finish_all("abort")
                )
                return
            try:
                self._publish(self._apply(commands))
                self._publish(self.engine.step())
            except Exception as exc:  # noqa: BLE001 - any failure ends the engine, see module doc
                self._die(exc)
                return

    def _apply(self, commands: list[tuple]) -> list[RequestOutput]:
        failed = []
        for command in commands:
            if command[0] == "add":
                _, request_id, ids, params, arrival = command
                try:
                    self.engine.add_request(request_id, ids, params, arrival)
                except InvalidRequestError as exc:
                    failed.append(_final_output(request_id, "error", str(exc)))
            else:
                self.engine.abort_request(command[1])
        return failed

    def _die(self, exc: Exception) -> None:
        logger.exception("engine step failed; failing all requests")
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        with self._cond:
            self._dead = message
            commands, self._commands = self._commands, []
        outputs = self._unserved(commands, "error", message)
        try:
            outputs += self.engine.finish_all("error", message)
        except Exception:  # noqa: BLE001 - the callers must still hear of it
            logger.exception("cleanup after the failed step failed too")
            outputs += [_final_output(rid, "error", message) for rid in list(self.engine.seqs)]
        self._publish(outputs)

    @staticmethod
    def _unserved(commands: list[tuple], reason: str, message: str | None) -> list[RequestOutput]:
        return [_final_output(c[1], reason, message) for c in commands if c[0] == "add"]

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, outputs)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)


def _final_output(request_id: str, reason: str, message: str | None) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason=reason,
        error=message,
        time=time.monotonic(),  # type: ignore[arg-type]
    )
