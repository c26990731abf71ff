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
    scheduler.update(plan, [token if s.sample else None for s in plan.scheduled])
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
