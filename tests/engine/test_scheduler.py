"""Scheduler plans, without a model: budgets, chunking, order, preemption, rejection."""

from __future__ import annotations

from palm_serve.engine.sequence import SequenceStatus

import engine_helpers
from engine_helpers import greedy, make_request, make_scheduler

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread


def plan_of(plan) -> list[tuple[str, int, int, bool]]:
    return [(s.seq.request_id, s.start, s.num_new_tokens, s.sample) for s in plan.scheduled]


def step(scheduler, token: int = 7):
    """Plan, then apply: every due sequence gets `token`."""
    plan = scheduler.schedule()
    scheduler.update(plan, [[token] if s.sample else [] for s in plan.scheduled])
    return plan


def test_chunked_prefill_samples_only_at_the_end() -> None:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    a = make_request("a", list(range(20)))
    sched.add(a)
    assert plan_of(step(sched)) == [("a", 0, 8, False)]
    assert plan_of(step(sched)) == [("a", 8, 8, False)]
    assert plan_of(step(sched)) == [("a", 16, 4, True)]
    assert a.output_token_ids == [7]
    assert plan_of(step(sched)) == [("a", 20, 1, True)]


def test_decodes_first_then_arrivals_in_order_within_the_budget() -> None:
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=10)
    a, b, c = (make_request(n, [i] * 6) for i, n in enumerate("abc"))
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.add(c)
    # a decodes (1), b prefills 6, c gets the 3 tokens left.
    assert plan_of(step(sched)) == [("a", 6, 1, True), ("b", 0, 6, True), ("c", 0, 3, False)]
    # Decodes of a, b first; then c's unfinished prefill.
    assert plan_of(step(sched)) == [("a", 7, 1, True), ("b", 6, 1, True), ("c", 3, 3, True)]


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(num_blocks=32, max_num_seqs=2)
    for n in "abc":
        sched.add(make_request(n, [1, 2, 3]))
    assert [s[0] for s in plan_of(step(sched))] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_head_of_queue_is_not_overtaken() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add(make_request("big", list(range(12))))  # 3 blocks
    step(sched)
    sched.add(make_request("wide", list(range(30, 38))))  # 2 blocks: does not fit
    sched.add(make_request("small", [1]))  # would fit, but arrived later
    assert plan_of(step(sched)) == [("big", 12, 1, True)]
    assert [s.request_id for s in sched.waiting] == ["wide", "small"]


def test_decode_without_a_block_preempts_the_newest() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a, b = make_request("a", [1, 2, 3], greedy(10)), make_request("b", [4, 5, 6], greedy(10))
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 2 blocks, b: 2 blocks, pool full; each has 4 tokens now
    plan = step(sched)  # both decode into their second block's last slot
    assert plan_of(plan) == [("a", 3, 1, True), ("b", 3, 1, True)]
    plan = step(sched)  # a needs a third block: b (newest) is preempted
    assert plan_of(plan) == [("a", 4, 1, True)] and plan.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    # b keeps its generated tokens and is recomputed (prompt + outputs) when blocks free up.
    assert b.output_token_ids == [7, 7]


def test_prompt_that_can_never_fit_is_rejected_alone() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    huge, ok = make_request("huge", list(range(17))), make_request("ok", [1, 2])
    sched.add(huge)
    sched.add(ok)
    plan = sched.schedule()
    assert plan.rejected == [huge] and huge.finish_reason == "error"
    assert "17 tokens" in huge.error and "holds 16" in huge.error
    assert plan_of(plan) == [("ok", 0, 2, True)]


def test_prefix_hits_are_counted_and_skip_prefill() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4)
    sched.add(make_request("a", list(range(10))))
    step(sched)
    sched.add(make_request("b", list(range(8)) + [50, 51, 52]))
    plan = step(sched)
    assert plan_of(plan)[1] == ("b", 8, 3, True)
    assert sched.prefix_cache_hit_tokens == 8


def test_a_chunk_that_leaves_two_prompt_tokens_finishes_next_step() -> None:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    sched.add(make_request("a", list(range(10))))
    assert plan_of(step(sched)) == [("a", 0, 8, False)]
    assert plan_of(step(sched)) == [("a", 8, 2, True)]


def test_a_budget_used_up_exactly_defers_the_next_decode() -> None:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=3)
    for n in "abc":
        sched.add(make_request(n, [1]))
    assert [s[0] for s in plan_of(step(sched))] == ["a", "b", "c"]
    sched.max_num_batched_tokens = 2
    # a and b use the whole budget; c's decode waits, with no empty entry in the plan.
    assert plan_of(step(sched)) == [("a", 1, 1, True), ("b", 1, 1, True)]


def test_a_sequence_that_preempts_itself_leaves_its_budget_to_others() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=12)
    a, c, b = (
        make_request("a", [1, 2]),
        make_request("c", list(range(6))),
        make_request("b", [5] * 4),
    )
    for seq in (a, c, b):
        sched.add(seq)
    # a: block 0; c: blocks 1, 2; b: block 3 -- the pool is full.
    assert plan_of(step(sched)) == [("a", 0, 2, True), ("c", 0, 6, True), ("b", 0, 4, True)]
    c.num_computed_tokens = 5  # as if c's prefill had been chunked: 2 tokens, in its blocks
    sched.max_num_batched_tokens = 2
    # a decodes in its block; b needs a fifth block and is the newest: it preempts itself,
    # and the token of budget it did not use goes to c.
    plan = step(sched)
    assert plan_of(plan) == [("a", 2, 1, True), ("c", 5, 1, False)]
    assert plan.preempted == [b] and b.status is SequenceStatus.WAITING


def test_a_prompt_that_exactly_fills_the_pool_is_served() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    full = make_request("full", list(range(16)))
    sched.add(full)
    plan = step(sched)
    assert plan_of(plan) == [("full", 0, 16, True)] and not plan.rejected


def test_plans_never_exceed_the_budget_or_hold_empty_entries() -> None:
    """Random arrivals into a pool small enough to preempt, a sequence preempting itself
    included: every plan stays within the token budget and every entry computes >= 1."""
    import random

    rng = random.Random(3)
    for trial in range(20):
        budget = rng.randint(1, 12)
        sched = make_scheduler(
            num_blocks=rng.randint(3, 8), block_size=2, max_num_batched_tokens=budget
        )
        for i in range(6):
            sched.add(make_request(f"{trial}-{i}", [rng.randrange(50)] * rng.randint(1, 5),
                                   greedy(rng.randint(1, 8))))  # fmt: skip
        for _ in range(60):
            plan = step(sched)
            assert plan.num_batched_tokens == sum(s.num_new_tokens for s in plan.scheduled)
            assert plan.num_batched_tokens <= budget
            assert all(s.num_new_tokens >= 1 for s in plan.scheduled)
            if not sched.has_unfinished():
                break


class FixedDrafts:
    """A DraftPolicy stand-in: every decode drafts the same tokens, as many as the budget
    leaves after its own token (the scheduler's side of speculation, without a proposer)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.asked: list[tuple[str, int, int]] = []

    def draft(self, seq, num_running: int, budget: int) -> list[int]:
        self.asked.append((seq.request_id, num_running, budget))
        return self.tokens[: budget - 1] if seq.num_uncomputed_tokens == 1 else []


def drafting_scheduler(drafts: FixedDrafts, num_blocks: int, **kw):
    from palm_serve.engine.block_manager import BlockManager
    from palm_serve.engine.config import EngineConfig
    from palm_serve.engine.scheduler import Scheduler

    config = EngineConfig(num_blocks=num_blocks, block_size=2, **kw)
    bm = BlockManager(num_blocks, 2)
    return Scheduler(config, bm, 10_000, eos_token_id=None, draft_policy=drafts)


def test_decodes_carry_their_drafts_and_keep_only_what_was_accepted() -> None:
    drafts = FixedDrafts([5, 6, 7])
    sched = drafting_scheduler(drafts, num_blocks=12, max_num_batched_tokens=10)
    a, b = make_request("a", [1, 2, 3], greedy(10)), make_request("b", [4, 4, 4], greedy(10))
    sched.add(a)
    sched.add(b)
    step(sched)  # prefills; a = 1 2 3 7 and b = 4 4 4 7, 3 computed each
    sched.add(make_request("c", [8] * 5))
    drafts.asked.clear()
    plan = sched.schedule()
    # Each decode: 1 known token + 3 drafts; c gets the 2 tokens of budget left.
    assert plan_of(plan) == [("a", 3, 4, True), ("b", 3, 4, True), ("c", 0, 2, False)]
    assert [s.draft for s in plan.scheduled] == [[5, 6, 7], [5, 6, 7], []]
    assert (plan.num_batched_tokens, plan.num_draft_tokens) == (10, 6)
    assert drafts.asked == [("a", 2, 10), ("b", 2, 6)]
    assert a.block_table == [0, 1, 4, 5]  # 4 tokens + 3 draft slots
    sched.update(plan, [[5, 9], [8], []])  # a: draft 5 accepted, then its own token; b: none
    assert a.token_ids == [1, 2, 3, 7, 5, 9] and a.num_computed_tokens == 5
    assert b.num_computed_tokens == 4
    assert (sched.num_draft_tokens, sched.num_accepted_draft_tokens) == (6, 1)
    # Blocks holding only rejected drafts (a's 5, b's 6 and 7) go first in line for reuse.
    assert a.block_table == [0, 1, 4] and b.block_table == [2, 3]
    assert list(sched.block_manager.free_queue)[:3] == [7, 6, 5]


def test_a_draft_that_finds_no_blocks_is_dropped_before_anyone_is_preempted() -> None:
    sched = drafting_scheduler(FixedDrafts([5, 6]), num_blocks=3)
    a, b = make_request("a", [1, 2, 3], greedy(10)), make_request("b", [4], greedy(10))
    sched.add(a)
    sched.add(b)
    step(sched)  # a: blocks 0, 1; b: block 2; the pool is full
    plan = sched.schedule()
    assert plan_of(plan) == [("a", 3, 1, True), ("b", 1, 1, True)]
    assert [s.draft for s in plan.scheduled] == [[], []] and not plan.preempted
    assert plan.num_draft_tokens == 0


def test_an_older_prefill_without_a_block_preempts_itself_not_a_planned_decode() -> None:
    sched = make_scheduler(num_blocks=3, block_size=2, enable_prefix_caching=False)
    a, b = make_request("a", [1, 2, 3, 4], greedy(10)), make_request("b", [5], greedy(10))
    sched.add(a)
    sched.add(b)
    step(sched)  # a: blocks 0, 1; b: block 2; the pool is full
    a.num_computed_tokens = 2  # as if a's prefill had been chunked: 3 tokens left, 3 blocks
    plan = step(sched)  # b decodes first (planned); a is the newest unplanned: itself
    assert plan_of(plan) == [("b", 1, 1, True)] and plan.preempted == [a]
    assert sched.num_preemptions == 1
    step(sched)
    a.num_computed_tokens = 2
    sched.running.append(sched.waiting.popleft())  # back, mid-prefill, and preempted again
    a.status = SequenceStatus.RUNNING
    assert step(sched).preempted == [a] and sched.num_preemptions == 2


def test_abort_finishes_a_waiting_or_running_request_and_frees_its_blocks() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [4, 5, 6, 7, 8, 9])
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.abort(b)
    sched.abort(a)
    assert (a.finish_reason, b.finish_reason) == ("abort", "abort")
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 4


def test_the_context_end_stops_a_request_at_exactly_max_model_len() -> None:
    sched = make_scheduler(num_blocks=8, max_model_len=5)
    a = make_request("a", [1, 2, 3], greedy(10))
    sched.add(a)
    while sched.has_unfinished():
        step(sched)
    assert (a.num_tokens, a.finish_reason) == (5, "length")


def test_prefix_hits_add_up_and_the_first_admission_is_timed() -> None:
    import time

    sched = make_scheduler(num_blocks=16, block_size=4)
    before = time.monotonic()
    sched.add(make_request("a", list(range(10))))
    step(sched)
    for name in "bc":
        sched.add(make_request(name, list(range(8)) + [50]))
        step(sched)
    assert sched.prefix_cache_hit_tokens == 16
    assert all(before <= s.first_scheduled_time <= time.monotonic() for s in sched.running)
