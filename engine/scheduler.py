"""Scheduler: one plan per step (iteration-level batching, as in vLLM v1 / nano-vllm).

Running sequences first (decodes, then unfinished prefill chunks), then waiting ones in
arrival order while max_num_seqs and the token budget allow; a prompt larger than what
is left of the budget is prefilled in chunks. When a running sequence cannot get a block,
the newest running sequence not yet planned this step is preempted by recompute (blocks
freed, requeued at the front). It plans and applies results; it never touches a tensor."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .outputs import FinishReason
from .sequence import Sequence, SequenceStatus
from .stop_rules import check_stop


@dataclass
class ScheduledSeq:
    seq: Sequence
    # Position of the first token computed this step (= tokens already in the cache).
    start: int
    # Tokens computed this step: 1 for a decode, a chunk (or all) of the rest for a prefill.
    num_new_tokens: int
    # True when this step reaches the end of the known tokens, so a new token is due.
    sample: bool


@dataclass
class SchedulerOutput:
    # The batch of this step, in row order of the flattened model input.
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # Sequences preempted (blocks freed, back to waiting) while planning this step.
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences rejected while planning (they can never fit); finished with an error.
    rejected: list[Sequence] = field(default_factory=list)
    # Sum of num_new_tokens (<= max_num_batched_tokens).
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        max_model_len: int,
        eos_token_id: int | None,
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:  # not preempted earlier in this loop
                budget -= self._schedule_running(seq, budget, plan)
        self._admit_waiting(budget, plan)
        return plan

    def _schedule_running(self, seq: Sequence, budget: int, plan: SchedulerOutput) -> int:
        num_new = min(seq.num_uncomputed_tokens, budget)
        while not self.block_manager.allocate(seq, num_new):
            planned = {id(s.seq) for s in plan.scheduled}
            victims = [s for s in self.running if id(s) not in planned]
            victim = victims[-1]  # the newest unplanned; seq itself is among them
            self._preempt(victim, plan)
            if victim is seq:
                return 0
        self._plan(seq, num_new, plan)
        return num_new

    def _admit_waiting(self, budget: int, plan: SchedulerOutput) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if bm.blocks_needed(seq.num_tokens) > bm.num_blocks:
                self._reject(seq, plan)
                continue
            cached = [] if seq.wants_prompt_logprobs else bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate(seq, num_new, cached):
                break  # arrival order: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_cached
            self.prefix_cache_hit_tokens += num_cached
            if seq.first_scheduled_time is None:
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = time.monotonic()
            self._plan(seq, num_new, plan)
            budget -= num_new

    def _plan(self, seq: Sequence, num_new: int, plan: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        sample = start + num_new == seq.num_tokens
        plan.scheduled.append(ScheduledSeq(seq, start, num_new, sample))
        plan.num_batched_tokens += num_new

    def _preempt(self, seq: Sequence, plan: SchedulerOutput) -> None:
        """Recompute later: drop the blocks (cached ones stay findable), requeue first."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        plan.preempted.append(seq)

    def _reject(self, seq: Sequence, plan: SchedulerOutput) -> None:
        self.waiting.popleft()
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        self.reject(
            seq,
            f"the sequence needs {seq.num_tokens} tokens of KV cache; the pool holds {capacity}",
        )
        plan.rejected.append(seq)

    def reject(self, seq: Sequence, message: str) -> None:
        """Finish a sequence that can never be served (it holds no blocks)."""
        seq.error = message
        self._finish(seq, "error")

    # ---- applying results ----------------------------------------------------------------

    def update(self, plan: SchedulerOutput, sampled: list[int | None]) -> list[Sequence]:
        """Apply one step: advance computed counts, append sampled tokens (one entry per
        plan.scheduled, None where no token was due) and finish sequences that stop.
        Returns the sequences with something to report."""
        touched = list(plan.rejected)
        for item, token in zip(plan.scheduled, sampled, strict=True):
            seq = item.seq
            seq.num_computed_tokens = item.start + item.num_new_tokens
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = check_stop(seq, token, self.eos_token_id, self.max_model_len)
            if reason is not None:
                self._finish(seq, reason)
            touched.append(seq)
        return touched

    def abort(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
