"""LLMEngine: the engine in one thread, for library use, tests and benchmarks: the front's
processors around an in-process EngineCore, stepped by the caller. The server uses
AsyncEngine instead, whose core runs apart from the event loop."""

from __future__ import annotations

import time

from .block_manager import BlockManager
from .core import EngineCore
from .input_processor import InputProcessor
from .messages import EngineCoreRequest
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .stats import EngineStats


class LLMEngine:
    def __init__(
        self,
        core: EngineCore,
        input_processor: InputProcessor,
        output_processor: OutputProcessor,
    ) -> None:
        self.core = core
        self.input_processor = input_processor
        self.output_processor = output_processor
        # Outputs produced between steps (aborts), returned by the next step.
        self._pending: list[RequestOutput] = []

    @property
    def block_manager(self) -> BlockManager:
        return self.core.block_manager

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request as given: one the core can never serve fails alone at the next
        step (use input_processor.make_request to refuse it up front instead)."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        request = EngineCoreRequest(request_id, list(prompt_token_ids), params, arrival)
        self.output_processor.add_request(request)
        self.core.add_request(request)

    def abort_request(self, request_id: str) -> None:
        out = self.output_processor.finish(request_id, "abort")
        if out is not None:
            self._pending.append(out)
        self.core.finish_requests([request_id], "abort")

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        if processed.stopped:
            self.core.finish_requests(processed.stopped, "stop")
        outputs, self._pending = self._pending + processed.outputs, []
        return outputs

    def stats(self) -> EngineStats:
        return self.core.stats()
