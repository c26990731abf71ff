"""LLMEngine: the synchronous engine. step() = schedule, run, update, report.

Single-threaded: the AsyncEngine calls it from its worker thread only."""

from __future__ import annotations

import random
import time

import torch

from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from .block_manager import BlockManager
from .errors import InvalidRequestError
from .model_runner import ModelRunner
from .outputs import FinishReason, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .stats import EngineStats
from .stop_checker import StopChecker


class LLMEngine:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        seed: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.block_manager: BlockManager = scheduler.block_manager
        self.max_model_len = scheduler.max_model_len
        # Seeds the generators of unseeded requests (each still gets its own stream).
        self._rng = random.Random(seed)
        self.seqs: dict[str, Sequence] = {}
        self.stats_counters = EngineStats()
        # Finished outside a step (rejected at arrival, aborted): reported by the next step.
        self._rejected: list[Sequence] = []

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.seqs:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            generator=torch.Generator().manual_seed(seed),
            stop_checker=StopChecker(
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids), params.stop
            ),
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        )
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self.seqs[request_id] = seq
        if not prompt_token_ids or len(prompt_token_ids) >= self.max_model_len:
            # Fails alone at the next step; validate() catches this earlier for the server.
            message = (
                f"prompt has {len(prompt_token_ids)} tokens; the context length (max_model_len) "
                f"is {self.max_model_len}, so at most {self.max_model_len - 1} fit"
            )
            self.scheduler.reject(seq, message)
            self._rejected.append(seq)
            return
        self.scheduler.add(seq)
        self.stats_counters.prompt_tokens += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        self.scheduler.abort(seq)
        self.stats_counters.num_aborted += 1
        self._rejected.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self._rejected) or self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        touched = self._take_rejected()
        if not plan.is_empty:
            result = self.runner.execute(plan)
            self.stats_counters.num_steps += 1
            self.stats_counters.num_batched_tokens += plan.num_batched_tokens
            for seq, entries in result.prompt_logprobs:
                seq.prompt_logprobs.extend(entries)
            for item, lp in zip(plan.scheduled, result.logprobs, strict=True):
                if lp is not None:
                    item.seq.pending_logprobs.append(lp)
            touched += self.scheduler.update(plan, result.sampled)
        else:
            touched += self.scheduler.update(plan, [])
        return [self._output(seq) for seq in dict.fromkeys(touched)]

    def finish_all(self, reason: FinishReason, message: str | None = None) -> list[RequestOutput]:
        """Every unfinished request ends now (reason "error" after a failed step, "abort" at
        shutdown); returns their last outputs and leaves the pool whole."""
        outputs = []
        for seq in list(self.seqs.values()):
            if not seq.is_finished:
                self.scheduler.abort(seq)
                seq.finish_reason, seq.error = reason, message
            outputs.append(self._output(seq))
        self._rejected.clear()
        if reason == "error":  # K/V written by the failed step cannot be trusted
            self.block_manager.reset_prefix_cache()
        return outputs

    def stats(self) -> EngineStats:
        s = self.stats_counters
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.block_manager.usage
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_hit_tokens = self.scheduler.prefix_cache_hit_tokens
        return EngineStats(**vars(s))

    # ---- outputs -------------------------------------------------------------------------

    def _take_rejected(self) -> list[Sequence]:
        taken = list(self._rejected)
        self._rejected.clear()
        return taken

    def _output(self, seq: Sequence) -> RequestOutput:
        """The increment of seq since its previous output; forgets a finished sequence."""
        now = time.monotonic()
        new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
        if new_ids and seq.first_token_time is None:
            seq.first_token_time = now
        seq.num_emitted_tokens += len(new_ids)
        self.stats_counters.generation_tokens += len(new_ids)
        finished = seq.is_finished
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=seq.stop_checker.take_text(final=finished),
            finished=finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            logprobs=self._take_logprobs(seq),
            stop_reason=seq.stop_reason,
            prompt_token_ids=seq.prompt_token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            time=now,
        )
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True
        if finished:
            self._count_finish(seq)
            del self.seqs[seq.request_id]
        return out

    def _take_logprobs(self, seq: Sequence):
        if seq.params.logprobs is None:
            return None
        taken, seq.pending_logprobs = seq.pending_logprobs, []
        return taken

    def _count_finish(self, seq: Sequence) -> None:
        self.stats_counters.num_finished += 1
        if seq.finish_reason == "error":
            self.stats_counters.num_failed += 1
