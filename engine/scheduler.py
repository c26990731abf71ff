"""Scheduler: one plan per step (iteration-level batching, as in vLLM v1 / nano-vllm).

Running sequences first (decodes, then unfinished prefill chunks), then waiting ones in
arrival order while max_num_seqs and the token budget allow; a prompt larger than what
is left of the budget is prefilled in chunks. When a running sequence cannot get a block,
the newest running sequence not yet planned this step is preempted by recompute (blocks
freed, requeued at the front). With a DraftPolicy, a decode may carry draft tokens to be
verified in the same step (their slots reserved, counted in the budget; a draft that does
not fit is dropped before anyone is preempted for it). A batch of plain decodes, with
nobody waiting, may run several forward passes in one plan (config.num_scheduler_steps; the
slots of the later passes reserved like a draft's). It plans and applies results; it never
touches a tensor."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .draft_policy import DraftPolicy
from .outputs import FinishReason
from .sampler import needs_only_the_model
from .sequence import Sequence, SequenceStatus
from .stop_rules import check_stop


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    # Position of the first token computed this step (= tokens already in the cache).
    start: int
    # Tokens computed this step: 1 for a decode, a chunk (or all) of the rest for a prefill;
    # draft tokens included.
    num_new_tokens: int
    # True when this step reaches the end of the known tokens, so a new token is due.
    sample: bool
    # Draft tokens that follow the known ones in this step's input (speculative decoding):
    # the step verifies them and emits 1..len(draft) + 1 tokens.
    draft: list[int] = field(default_factory=list)

    @property
    def num_known_tokens(self) -> int:
        """Tokens of this step already in seq.token_ids (the rest are drafts)."""
        return self.num_new_tokens - len(self.draft)


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
    # Sum of len(draft).
    num_draft_tokens: int = 0
    # Forward passes: 1, or up to num_scheduler_steps for a batch of decodes that each
    # sample a token per pass, the next pass's input (the runner may stop after fewer).
    num_passes: int = 1

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
        draft_policy: DraftPolicy | None = None,
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.draft_policy = draft_policy
        self.num_scheduler_steps = config.num_scheduler_steps
        # The core ends a plan's passes by this time (EngineCore._last_pass).
        self.scheduler_steps_max_ms = config.scheduler_steps_max_ms
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0
        # Draft tokens verified, and those the target accepted.
        self.num_draft_tokens = 0
        self.num_accepted_draft_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for seq in self.running:
            uncomputed = seq.num_uncomputed_tokens
            if uncomputed == 1:
                decodes.append(seq)
            elif uncomputed > 1:
                prefills.append(seq)
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING:  # not preempted earlier in this loop
                budget -= self._schedule_running(seq, budget, plan)
        self._admit_waiting(budget, plan)
        if self.num_scheduler_steps > 1:
            plan.num_passes = self._reserve_passes(plan)
        return plan

    def _reserve_passes(self, plan: SchedulerOutput) -> int:
        """Forward passes for plan, with the slots of the passes after the first allocated.
        Several only for a batch of decodes without drafts whose next tokens need nothing
        of the ones before them but the model (needs_only_the_model) and whose ends the
        core sees (no stop strings: the front matches those), while
        nobody waits (an arrival would wait for every pass); no more than the tokens every
        sequence may still generate (so that none waits, finished, for the others)."""
        if self.waiting or plan.preempted or plan.rejected or not plan.scheduled:
            return 1
        seqs = []
        for item in plan.scheduled:
            seq = item.seq
            if (
                item.num_new_tokens != 1
                or not item.sample
                or item.draft
                or seq.params.stop
                or not needs_only_the_model(seq)
            ):
                return 1
            seqs.append(seq)
        passes = min(
            self.num_scheduler_steps,
            min(self.max_model_len - seq.num_tokens for seq in seqs),
            min(seq.params.max_tokens - seq.num_output_tokens for seq in seqs),
        )
        if passes <= 1:
            return 1
        bm = self.block_manager
        needed = sum(
            max(bm.blocks_needed(seq.num_tokens + passes - 1) - len(seq.block_table), 0)
            for seq in seqs
        )
        if needed > bm.num_free_blocks:
            return 1
        for seq in seqs:
            reserved = bm.allocate(seq, 1, num_lookahead_tokens=passes - 1)
            assert reserved, "counted free blocks must cover every sequence's passes"
        return passes

    def _schedule_running(self, seq: Sequence, budget: int, plan: SchedulerOutput) -> int:
        num_new = min(seq.num_uncomputed_tokens, budget)
        policy = self.draft_policy
        draft = policy.draft(seq, len(self.running), budget) if policy is not None else None
        if draft and self.block_manager.allocate(seq, num_new, num_lookahead_tokens=len(draft)):
            self._plan(seq, num_new, plan, draft)
            return num_new + len(draft)
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

    def _plan(
        self, seq: Sequence, num_new: int, plan: SchedulerOutput, draft: list[int] | None = None
    ) -> None:
        """num_new known tokens, then the draft tokens (if any)."""
        start = seq.num_computed_tokens
        sample = start + num_new == seq.num_tokens
        draft = draft or []
        plan.scheduled.append(ScheduledSeq(seq, start, num_new + len(draft), sample, draft))
        plan.num_batched_tokens += num_new + len(draft)
        plan.num_draft_tokens += len(draft)

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

    def update(self, plan: SchedulerOutput, sampled: list[list[int]]) -> list[Sequence]:
        """Apply one step: advance computed counts, append the step's tokens (one list per
        plan.scheduled: empty where no token was due, one token, a verified draft's
        accepted tokens and the one after them, or a token per forward pass run), checking
        the stop rules after each in order, and finish sequences that stop. Returns the
        sequences with something to report."""
        touched = list(plan.rejected)
        for item, tokens in zip(plan.scheduled, sampled, strict=True):
            seq = item.seq
            # Accepted drafts (all tokens but the last) are computed: their K/V is written.
            seq.num_computed_tokens = item.start + item.num_known_tokens + max(len(tokens) - 1, 0)
            if item.draft:
                self.num_draft_tokens += len(item.draft)
                self.num_accepted_draft_tokens += len(tokens) - 1
            if tokens:
                self._append(seq, tokens)
                touched.append(seq)
            if (item.draft or plan.num_passes > 1) and not seq.is_finished:
                self.block_manager.release_unverified(seq, item.start)
        return touched

    def _append(self, seq: Sequence, tokens: list[int]) -> None:
        """Append tokens one by one; the first that stops seq finishes it (the rest dropped)."""
        for token in tokens:
            seq.token_ids.append(token)
            reason = check_stop(seq, token, self.eos_token_id, self.max_model_len)
            if reason is not None:
                self._finish(seq, reason)
                return

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
