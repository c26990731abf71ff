"""AsyncEngine: the front of the engine, the only thing the server talks to.

It tokenizes and validates in the caller's thread (InputProcessor), hands token ids to
the core through a CoreClient, and turns the core's outputs into text on the event loop
(OutputProcessor), one asyncio.Queue per request. The event loop never waits on the model.

One abort path: a caller that stops iterating (or calls abort) ends its request here and
sends the core one FinishRequests; a stop string does the same with reason "stop".

When the core dies (a failed step, a killed core process), every in-flight request gets a
final output with finish_reason "error" and the message at once, `healthy` turns False,
and generate() raises EngineDeadError. A CoreClient that restarts its core (a core
process) reports the new core, and the engine serves again ("restarting" -> "ready")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

from ..model.model_config import ModelConfig
from ..model.tokenizer import Tokenizer
from .core_client import CoreClient
from .errors import EngineDeadError, InvalidRequestError
from .input_processor import InputProcessor
from .messages import EngineCoreOutputs, EngineCoreRequest, FinishRequests
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .sampling_params import SamplingParams, StructuredOutputSpec
from .stats import EngineStats
from .structured_output import StructuredOutputValidator


@dataclass(frozen=True)
class EngineInfo:
    """What the core computed at start and the front reports."""

    model_config: ModelConfig
    max_model_len: int
    num_blocks: int
    block_size: int
    backend_name: str
    # Where the core runs: its process id (None: a thread of this process), its torch
    # threads and the CPUs it may use (empty: not pinned, or unknown).
    core_pid: int | None = None
    num_threads: int | None = None
    cpus: tuple[int, ...] = ()
    # Its torch threads for a step of decodes only (None: num_threads).
    decode_threads: int | None = None
    # Bytes of the model's weights in the core's memory (0: not known, e.g. under TP).
    weight_bytes: int = 0


# "restarting": the core died and a new one is starting; "dead": no new one will come;
# "stopped": shutdown() was called.
EngineStatus = Literal["starting", "ready", "restarting", "dead", "stopped"]


class AsyncEngine:
    def __init__(self, client: CoreClient, tokenizer: Tokenizer, info: EngineInfo) -> None:
        self.client = client
        self.info = info
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(
            tokenizer, info.model_config.vocab_size, info.max_model_len
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.structured_output = StructuredOutputValidator(tokenizer, info.model_config.vocab_size)
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stats = EngineStats()
        self._started = False
        self._stopped = False
        self._dead: str | None = None  # why the engine cannot serve, while it cannot
        self._restarting = False
        self.num_restarts = 0

    # ---- figures ------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def healthy(self) -> bool:
        return self.status == "ready"

    @property
    def status(self) -> EngineStatus:
        if self._stopped:
            return "stopped"
        if not self._started:
            return "starting"
        if self._dead is None:
            return "ready"
        return "restarting" if self._restarting else "dead"

    def stats(self) -> EngineStats:
        """The core's figures after its latest step (never a round trip to the core)."""
        return self._stats

    # ---- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        await self.client.start(self._on_outputs, self._on_death, self._on_revival)
        self._started = True

    async def shutdown(self) -> None:
        """Stop the core; unfinished requests end with finish_reason "abort"."""
        self._stopped = True
        if self._dead is None:
            self._dead = "the engine is shut down"
        await self.client.shutdown()
        self._deliver(self.output_processor.finish_all("abort"))

    # ---- requests -----------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """A prompt's token ids: call once per prompt, however many requests share it.
        param: the request field the prompt came from, named by an InvalidRequestError."""
        return self.input_processor.tokenize(prompt, param)

    def make_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> EngineCoreRequest:
        """Validate once: the request generate() will run, or InvalidRequestError."""
        return self.input_processor.make_request(prompt_ids, params, request_id)

    async def check_structured_output(self, spec: StructuredOutputSpec, param: str) -> None:
        """InvalidRequestError naming `param` (the request field the spec came from) and the
        reason when the spec does not compile. Compiled in a worker thread, off the event
        loop, and cached by spec (a schema sent again costs a dictionary lookup)."""
        error = await asyncio.to_thread(self.structured_output.error, spec)
        if error is not None:
            raise InvalidRequestError(f"{param}: {error}", param)

    async def generate(self, request: EngineCoreRequest) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of one request as they come (increments); the last has finished=True.
        Stopping early (aclose, cancellation) aborts the request."""
        request_id = request.request_id
        if not self._started:
            raise EngineDeadError("the engine is not started (await engine.start())")
        if self._dead is not None:
            raise EngineDeadError(
                f"the engine core is restarting after: {self._dead}"
                if self.status == "restarting"
                else self._dead
            )
        if request_id in self._queues:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add_request(request)
        self.client.add_request(request)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        """End a request now: its consumer gets a last output with finish_reason "abort"."""
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        out = self.output_processor.finish(request_id, "abort")
        if out is None:
            return  # finished already: nothing runs in the core
        self._deliver([out])
        self.client.finish_requests(FinishRequests([request_id], "abort"))

    # ---- from the core (on the event loop) ----------------------------------------------

    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        self._stats = outputs.stats
        processed = self.output_processor.process(outputs.outputs)
        self._deliver(processed.outputs)
        if processed.stopped:
            self.client.finish_requests(FinishRequests(processed.stopped, "stop"))

    def _on_death(self, message: str, restarting: bool) -> None:
        if self._stopped:
            return
        self._dead, self._restarting = message, restarting
        self._stats = EngineStats()  # the figures died with the core
        self._deliver(self.output_processor.finish_all("error", message))

    def _on_revival(self) -> None:
        if self._stopped:
            return
        self._dead, self._restarting = None, False
        self.num_restarts += 1

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
