"""Several forward passes per plan (num_scheduler_steps): which batches get them, the slots
they reserve and give back, when they end early, and outputs equal to one pass per plan:
greedy tokens and logprobs on the context-dependent model and the default model, seeded
sampling token for token, stop tokens, max_tokens and the context's end inside a plan."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

import palm_serve.model
from palm_serve.engine.core_main import CoreLoop
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.model import load_model

import engine_helpers
from engine_helpers import (
    assert_pool_whole,
    check_greedy,
    check_same_logprobs,
    greedy,
    make_context_model,
    make_engine,
    make_request,
    make_scheduler,
    run,
    tokens_of,
)

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread


@pytest.fixture(scope="module")
def model():
    return make_context_model()


# ---- planning --------------------------------------------------------------------------------


def decoding_scheduler(passes: int, *params: SamplingParams, **kw):
    """A scheduler whose requests (prompts of 6 tokens) are past their prefill."""
    sched = make_scheduler(num_blocks=kw.pop("num_blocks", 64), num_scheduler_steps=passes, **kw)
    seqs = [make_request(f"r{i}", [i + 1] * 6, p) for i, p in enumerate(params)]
    for seq in seqs:
        sched.add(seq)
    plan = sched.schedule()
    assert plan.num_passes == 1  # prompts: one pass
    sched.update(plan, [[5] for _ in plan.scheduled])
    return sched, seqs


def test_decodes_get_the_passes_and_their_slots() -> None:
    sched, (a, b) = decoding_scheduler(5, greedy(20), greedy(20))
    plan = sched.schedule()
    assert plan.num_passes == 5
    # Tokens 6 (known) to 10 (the 4th pass's input) need slots: 11 positions, 3 blocks of 4.
    assert [len(s.block_table) for s in (a, b)] == [3, 3]
    sched.update(plan, [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    assert a.output_token_ids == [5, 1, 2, 3, 4, 5] and a.num_computed_tokens == 11
    assert b.output_token_ids == [5, 6, 7, 8, 9, 10]
    # The block the passes filled is keyed with the tokens it holds; the one they did not
    # fill (position 11 is the last pass's token, not yet computed) is not.
    bm = sched.block_manager
    assert a.token_ids[4:8] == [1, 1, 5, 1]
    assert bm.blocks[a.block_table[1]].key == (a.block_hashes[0], (1, 1, 5, 1))
    assert bm.blocks[a.block_table[2]].key is None


def test_passes_cut_short_give_back_their_blocks() -> None:
    sched, (a,) = decoding_scheduler(8, greedy(40))
    plan = sched.schedule()
    assert plan.num_passes == 8 and len(a.block_table) == 4  # positions 0..13
    sched.update(plan, [[1, 2]])  # interrupted after two passes
    assert a.num_computed_tokens == 8 and len(a.block_table) == 2
    assert sched.block_manager.num_used_blocks == 2


@pytest.mark.parametrize(
    "params, why",
    [
        (greedy(20, stop=("x",)), "stop strings are the front's"),
        (greedy(20, repetition_penalty=1.2), "penalties count the tokens before each row"),
        (greedy(20, prompt_logprobs=1), "prompt logprobs still owed"),
    ],
)
def test_one_pass_for_a_batch_with_any_sequence_that_needs_one(params, why) -> None:
    sched, _ = decoding_scheduler(4, greedy(20), params)
    assert sched.schedule().num_passes == 1, why


def test_one_pass_while_a_request_waits_or_a_prompt_runs() -> None:
    sched, _ = decoding_scheduler(4, greedy(20), max_num_seqs=2)
    sched.add(make_request("waiting", [9] * 3))
    plan = sched.schedule()  # the arrival's prompt runs with the decode
    assert plan.num_passes == 1 and len(plan.scheduled) == 2
    sched.update(plan, [[1], [1]])
    sched.add(make_request("queued", [9] * 3))  # max_num_seqs: it waits
    assert sched.schedule().num_passes == 1


def test_passes_stop_at_the_shortest_max_tokens_and_context() -> None:
    sched, _ = decoding_scheduler(8, greedy(20), greedy(4))
    assert sched.schedule().num_passes == 3  # 1 generated, 3 left to the second
    sched, _ = decoding_scheduler(8, greedy(20), max_model_len=10)
    assert sched.schedule().num_passes == 3  # 7 tokens, the 8th to 10th fit


def test_one_pass_when_the_pool_cannot_hold_the_passes() -> None:
    # 2 blocks each for the prompts and their first decode; 4 passes need a 3rd each.
    sched, (a, b) = decoding_scheduler(4, greedy(20), greedy(20), num_blocks=5)
    plan = sched.schedule()
    assert plan.num_passes == 1
    assert [len(s.block_table) for s in (a, b)] == [2, 2]


# ---- served outputs equal one pass per plan ---------------------------------------------------


def mixed_requests(seed: int, n: int, sampled: bool = False):
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for i in range(n):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, 40))]
        max_tokens = rng.randint(1, 50)
        if sampled:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.9, seed=i)
        else:
            params = greedy(max_tokens, logprobs=2 if i % 3 == 0 else None)
        arrivals.setdefault(rng.randrange(40), []).append((f"r{i}", prompt, params))
    return arrivals


# No time budget: on a busy machine the passes the tests count would otherwise vary.
UNTIMED = dict(scheduler_steps_max_ms=1e9)


def serve(model, arrivals, passes: int, **kw):
    kw = {**UNTIMED, **kw}
    engine = make_engine(model, block_size=4, num_scheduler_steps=passes, **kw)
    steps = [0]
    outputs = run(engine, arrivals, on_step=lambda k: steps.__setitem__(0, k + 1))
    assert_pool_whole(engine)
    return outputs, engine.stats(), steps[0]


@pytest.mark.parametrize("passes", [4, 7])
def test_greedy_tokens_and_logprobs_equal_one_pass(model, passes) -> None:
    arrivals = mixed_requests(seed=1, n=40)
    plain, _, _ = serve(model, arrivals, 1)
    multi, stats, engine_steps = serve(model, arrivals, passes)
    assert stats.num_steps > 1.3 * engine_steps  # many plans ran several passes
    requests = {rid: (p, sp) for reqs in arrivals.values() for rid, p, sp in reqs}
    for rid, (prompt, params) in requests.items():
        got = tokens_of(multi[rid])
        assert got == tokens_of(plain[rid]), rid
        assert len(got) == params.max_tokens
        check_greedy(model, prompt, got)
        if params.logprobs is not None:
            check_same_logprobs(multi[rid], plain[rid], got, 1e-5)


def test_seeded_sampling_is_the_same_token_for_token(model) -> None:
    arrivals = mixed_requests(seed=2, n=32, sampled=True)
    plain, _, _ = serve(model, arrivals, 1)
    multi, stats, engine_steps = serve(model, arrivals, 6)
    assert stats.num_steps > 1.3 * engine_steps
    assert {r: tokens_of(o) for r, o in multi.items()} == {
        r: tokens_of(o) for r, o in plain.items()
    }


def test_stop_tokens_and_the_context_end_inside_a_plan(model) -> None:
    rng = random.Random(3)
    arrivals: dict[int, list] = {0: []}
    for i in range(24):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, 12))]
        stops = tuple(rng.sample(range(97), 4))
        arrivals[0].append((f"r{i}", prompt, greedy(60, stop_token_ids=stops, ignore_eos=True)))
    plain, _, _ = serve(model, arrivals, 1, max_model_len=48)
    multi, stats, engine_steps = serve(model, arrivals, 8, max_model_len=48)
    assert stats.num_steps > engine_steps
    assert {o[-1].finish_reason for o in plain.values()} == {"stop", "length"}
    for rid, outs in plain.items():
        assert tokens_of(multi[rid]) == tokens_of(outs)
        assert (multi[rid][-1].finish_reason, multi[rid][-1].stop_reason) == (
            outs[-1].finish_reason,
            outs[-1].stop_reason,
        )


def test_a_stop_token_ends_the_plan_after_its_pass(model) -> None:
    """Its request's output is complete: it is reported at once, and its neighbour stops
    with it rather than running the plan's later passes."""
    prompt_a, prompt_b = [3, 1, 4, 1, 5], [2, 7, 1, 8]
    free = serve(model, {0: [("a", prompt_a, greedy(30))]}, 1)[0]["a"]
    tokens = tokens_of(free)
    k = next(i for i in range(3, 30) if tokens[i] not in tokens[:i])  # first at output index k
    stop = greedy(30, stop_token_ids=(tokens[k],))
    engine = make_engine(model, block_size=4, num_scheduler_steps=64, **UNTIMED)
    engine.add_request("a", prompt_a, stop)
    engine.add_request("b", prompt_b, greedy(60))
    engine.step()  # the prompts: a token each
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].new_token_ids == tokens[1 : k + 1]
    assert len(outs["b"].new_token_ids) == k and not outs["b"].finished
    assert engine.stats().num_steps == 1 + k


def test_an_interrupted_plan_ends_after_the_pass_that_asked(model) -> None:
    requests = [(f"r{i}", [i + 1] * 5, greedy(40)) for i in range(3)]
    engine = make_engine(model, block_size=4, num_scheduler_steps=8, **UNTIMED)
    for request in requests:
        engine.add_request(*request)
    first = engine.step()
    asked = []

    def interrupted() -> bool:
        asked.append(True)
        return len(asked) == 3

    second = engine.output_processor.process(engine.core.step(interrupted)).outputs
    assert len(asked) == 3
    assert [len(o.new_token_ids) for o in second] == [3, 3, 3]
    rest = run(engine, {})
    plain = serve(model, {0: requests}, 1)[0]
    for rid, _, _ in requests:
        got = [t for outs in (first, second, rest.get(rid, [])) for o in outs if o.request_id == rid
               for t in o.new_token_ids]  # fmt: skip
        assert got == tokens_of(plain[rid])


def test_a_plan_ends_before_a_pass_would_overrun_its_time_budget(model) -> None:
    """Slots for 8 passes are reserved, but no second pass fits in a budget shorter than
    the first: each plan runs one, gives the rest back, and the outputs are unchanged."""
    arrivals = mixed_requests(seed=7, n=12)
    plain, _, _ = serve(model, arrivals, 1)
    engine = make_engine(model, block_size=4, num_scheduler_steps=8, scheduler_steps_max_ms=1e-6)
    reserved = []
    schedule = engine.core.scheduler.schedule

    def recorded():
        plan = schedule()
        reserved.append(plan.num_passes if plan.scheduled else 0)
        return plan

    engine.core.scheduler.schedule = recorded
    outputs = run(engine, arrivals)
    assert_pool_whole(engine)
    assert max(reserved) == 8
    assert engine.stats().num_steps == sum(1 for n in reserved if n)
    assert {r: tokens_of(o) for r, o in outputs.items()} == {
        r: tokens_of(o) for r, o in plain.items()
    }


def test_default_model_greedy_equal_one_pass() -> None:
    trained = load_model(Path(palm_serve.model.__file__).parent / "default")
    rng = random.Random(5)
    arrivals = {
        k: [(f"r{k}-{i}", [rng.randrange(4096) for _ in range(9)], greedy(33)) for i in range(3)]
        for k in (0, 5)
    }
    plain, _, _ = serve(trained, arrivals, 1)
    multi, stats, engine_steps = serve(trained, arrivals, 8)
    assert stats.num_steps > engine_steps
    assert {r: tokens_of(o) for r, o in multi.items()} == {
        r: tokens_of(o) for r, o in plain.items()
    }


# ---- the served core's loop --------------------------------------------------------------------


def test_the_core_loop_ends_passes_when_a_message_waits() -> None:
    context = zmq.Context()
    inbox, sender = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    try:
        inbox.bind("inproc://passes")
        sender.connect("inproc://passes")
        loop = CoreLoop(None, inbox, None, None, 0)  # type: ignore[arg-type]
        assert not loop._message_waiting()
        sender.send(b"request")
        deadline = time.monotonic() + 5
        while not loop._message_waiting():  # inproc delivery is quick, not instant
            assert time.monotonic() < deadline
            time.sleep(0.001)
        inbox.recv()
        assert not loop._message_waiting()
    finally:
        inbox.close(linger=0)
        sender.close(linger=0)
        context.term()


def test_a_request_with_stop_strings_keeps_its_batch_at_one_pass(model) -> None:
    stopped = greedy(12, stop=("@",))  # never matched: the piece tokenizer has no "@"
    arrivals = {0: [("s", [1, 2, 3], stopped), ("t", [4, 5], greedy(30))]}
    engine = make_engine(model, block_size=4, num_scheduler_steps=8)
    plans = []
    schedule = engine.core.scheduler.schedule

    def recorded():
        plan = schedule()
        plans.append(({s.seq.request_id for s in plan.scheduled}, plan.num_passes))
        return plan

    engine.core.scheduler.schedule = recorded
    outputs = run(engine, arrivals)
    assert all(passes == 1 for ids, passes in plans if "s" in ids)
    assert any(passes > 1 for _, passes in plans)  # t, alone after s ends
    unstopped = {0: [("s", [1, 2, 3], replace(stopped, stop=())), arrivals[0][1]]}
    plain = serve(model, unstopped, 1)[0]
    assert {r: tokens_of(o) for r, o in outputs.items()} == {
        r: tokens_of(o) for r, o in plain.items()
    }
