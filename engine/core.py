"""EngineCore: the model side of the engine. Token ids in, token ids out; step() =
schedule, run, update, report. It never sees text: the front detokenizes and checks stop
strings (output_processor.py).

Single-threaded: whoever drives it (a CoreClient's loop, or LLMEngine) calls it from one
thread only."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from .block_manager import BlockManager
from .messages import EngineCoreOutput, EngineCoreRequest
from .model_runner import ModelRunner, StepResult
from .outputs import FinishReason, TokenLogprob
from .sampling_params import StructuredOutputSpec
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .stats import EngineStats
from .structured_output import StructuredOutputManager


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        seed: int | None = None,
        structured: StructuredOutputManager | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.block_manager: BlockManager = scheduler.block_manager
        self.max_model_len = scheduler.max_model_len
        # Seeds the generators of unseeded requests (each still gets its own stream).
        self._rng = random.Random(seed)
        self.seqs: dict[str, Sequence] = {}
        self.counters = EngineStats()
        # Compiles structured-output specs; None: this core refuses constrained requests.
        self.structured = structured
        # Refused at arrival (they can never be served): reported, with an error, by the
        # next step. Aborted requests are not reported: their caller has already left.
        self._rejected: list[Sequence] = []

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        params = request.params
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            params=params,
            generator=torch.Generator().manual_seed(seed),
        )
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self.seqs[seq.request_id] = seq
        n = seq.num_prompt_tokens
        message = None
        if not n or n >= self.max_model_len:
            # The front's InputProcessor refuses these before they are sent; a caller that
            # skips it still gets one failed request, not a failed engine.
            message = (
                f"prompt has {n} tokens; the context length (max_model_len) "
                f"is {self.max_model_len}, so at most {self.max_model_len - 1} fit"
            )
        elif params.structured_output is not None:
            message = self._start_grammar(seq, params.structured_output)
        if message is not None:
            self.scheduler.reject(seq, message)
            self._rejected.append(seq)
            return
        self.scheduler.add(seq)
        self.counters.prompt_tokens += n

    def _start_grammar(self, seq: Sequence, spec: StructuredOutputSpec) -> str | None:
        """Give seq its matcher; the reason it cannot have one (the front validated the
        spec, so a caller that skipped the front)."""
        if self.structured is None:
            return "structured output: this engine core has no tokenizer to compile it for"
        try:
            seq.grammar = self.structured.start(spec)
        except ValueError as exc:
            return str(exc)
        return None

    def finish_requests(self, request_ids: list[str], reason: FinishReason = "abort") -> None:
        """Stop requests the front is done with (the caller left, or a stop string)."""
        for request_id in request_ids:
            seq = self.seqs.pop(request_id, None)
            if seq is None or seq.is_finished:
                continue
            self.scheduler.abort(seq)
            seq.finish_reason = reason
            if reason == "abort":
                self.counters.num_aborted += 1
            self._count_finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self._rejected) or self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------

    def step(self, interrupted: Callable[[], bool] | None = None) -> list[EngineCoreOutput]:
        """interrupted: asked between the forward passes of a plan of several (True: the
        caller's inbox has a message, which should not wait for every pass)."""
        plan = self.scheduler.schedule()
        touched, self._rejected = self._rejected, []
        result = StepResult([], [])
        if not plan.is_empty:
            last_pass = self._last_pass(plan, interrupted) if plan.num_passes > 1 else None
            result = self.runner.execute(plan, self._bitmask(plan), last_pass)
            self.counters.num_steps += result.num_passes
            self.counters.num_batched_tokens += plan.num_batched_tokens * result.num_passes
            for seq, entries in result.prompt_logprobs:
                seq.prompt_logprobs.extend(entries)  # type: ignore[union-attr]
        lengths = [item.seq.num_tokens for item in plan.scheduled]
        touched += self.scheduler.update(plan, result.sampled)
        for item, length, entries in zip(plan.scheduled, lengths, result.logprobs, strict=True):
            if entries:
                # Only the tokens appended: a stop rule drops the rest of a verified draft.
                item.seq.pending_logprobs.extend(entries[: item.seq.num_tokens - length])
        for seq in touched:
            if seq.grammar is not None:
                self._advance_grammar(seq)
        return [self._output(seq) for seq in dict.fromkeys(touched)]

    def _last_pass(
        self, plan: SchedulerOutput, interrupted: Callable[[], bool] | None
    ) -> Callable[[list[int]], bool]:
        """When a plan's passes end early: after a pass that sampled a sequence's EOS or stop
        token (its output is then complete; its neighbours' should not wait on later
        passes), when another pass as long as the last would end past the plan's time
        budget, or once the caller is interrupted."""
        eos = self.scheduler.eos_token_id
        params = [item.seq.params for item in plan.scheduled]
        budget = self.scheduler.scheduler_steps_max_ms / 1e3
        started = previous = time.perf_counter()

        def last_pass(tokens: list[int]) -> bool:
            nonlocal previous
            now = time.perf_counter()
            if 2 * now - previous - started > budget:
                return True
            previous = now
            for token, p in zip(tokens, params, strict=True):
                if (token == eos and not p.ignore_eos) or token in p.stop_token_ids:
                    return True
            return interrupted is not None and interrupted()

        return last_pass

    def _bitmask(self, plan: SchedulerOutput) -> torch.Tensor | None:
        """The allowed tokens of the sequences due a token (None: none is constrained)."""
        if self.structured is None:
            return None
        # Rows in the runner's order of sequences sampled from one row (drafted ones verify).
        due = [it.seq.grammar for it in plan.scheduled if it.sample and not it.draft]
        return self.structured.bitmask(due)

    def _advance_grammar(self, seq: Sequence) -> None:
        """Feed seq's matcher its new tokens; a grammar that is complete ends the request
        with "stop" (also when the same token reached max_tokens: the output is whole)."""
        grammar = seq.grammar
        assert grammar is not None
        grammar.advance(seq.output_token_ids)
        if grammar.error is not None and not seq.is_finished:
            self.scheduler.abort(seq)
            seq.finish_reason, seq.error = "error", f"structured output: {grammar.error}"
        elif grammar.is_complete and seq.finish_reason in (None, "length"):
            if not seq.is_finished:
                self.scheduler.abort(seq)
            seq.finish_reason, grammar.ended_request = "stop", True

    def finish_all(
        self, reason: FinishReason, message: str | None = None
    ) -> list[EngineCoreOutput]:
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
        s = self.counters
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.block_manager.usage
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_hit_tokens = self.scheduler.prefix_cache_hit_tokens
        s.num_draft_tokens = self.scheduler.num_draft_tokens
        s.num_accepted_draft_tokens = self.scheduler.num_accepted_draft_tokens
        return EngineStats(**vars(s))

    # ---- outputs -------------------------------------------------------------------------

    def _output(self, seq: Sequence) -> EngineCoreOutput:
        """The increment of seq since its previous output; forgets a finished sequence."""
        new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
        seq.num_emitted_tokens += len(new_ids)
        self.counters.num_output_tokens += len(new_ids)
        out = EngineCoreOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            finish_reason=seq.finish_reason,
            stop_token_id=seq.stop_token_id,
            error=seq.error,
            logprobs=self._take_logprobs(seq),
            num_cached_tokens=seq.num_cached_tokens,
            first_scheduled_time=seq.first_scheduled_time,
            grammar_complete=seq.grammar is not None and seq.grammar.ended_request,
        )
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True
        if seq.is_finished:
            self._count_finish(seq)
            self.seqs.pop(seq.request_id, None)
        return out

    @staticmethod
    def _take_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        if seq.params.logprobs is None:
            return None
        taken, seq.pending_logprobs = seq.pending_logprobs, []
        return taken

    def _count_finish(self, seq: Sequence) -> None:
        self.counters.num_finished += 1
        if seq.finish_reason == "error":
            self.counters.num_failed += 1
