"""The oracle: greedy tokens served by the engine (any batch mix, chunked prefill,
preemption, prefix hits, aborts around them) equal greedy decoding by the model's dense
no-cache forward of the same prompt."""

from __future__ import annotations

import random
import time

import pytest
import torch

from palm_serve.engine.errors import InvalidRequestError
from palm_serve.engine.input_processor import InputProcessor
from palm_serve.engine.sampling_params import SamplingParams

import engine_helpers
from engine_helpers import (
    PieceTokenizer,
    assert_pool_whole,
    check_greedy,
    greedy,
    make_context_model,
    make_engine,
    run,
    tokens_of,
)

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread


@pytest.fixture(scope="module")
def model():
    return make_context_model()


def random_requests(
    seed: int,
    n: int = 32,
    max_prompt: int = 300,
    max_steps: int = 60,
    max_new: int = 40,
    sampled: bool = False,
):
    """n requests: prompt lengths 1..max_prompt, max_tokens 1..max_new, arriving at random
    steps; greedy, or (sampled=True) seeded temperature sampling."""
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    prompts = {}
    for i in range(n):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, max_prompt))]
        max_tokens = rng.randint(1, max_new)
        if sampled:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=20, seed=i)
        else:
            params = greedy(max_tokens)
        prompts[f"r{i}"] = (prompt, params)
        arrivals.setdefault(rng.randrange(max_steps), []).append((f"r{i}", prompt, params))
    return arrivals, prompts


def check_all(model, outputs, prompts) -> int:
    ties = 0
    for request_id, (prompt, params) in prompts.items():
        outs = outputs[request_id]
        generated = tokens_of(outs)
        assert len(generated) == params.max_tokens
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        ties += check_greedy(model, prompt, generated)
    return ties


def test_staggered_requests_match_dense_greedy(model) -> None:
    # A 256-token budget: prompts of up to 300 tokens are prefilled in chunks.
    engine = make_engine(model, num_blocks=512, max_num_batched_tokens=256)
    arrivals, prompts = random_requests(seed=1)
    seen = []

    def watch(_step: int) -> None:
        stats, bm = engine.stats(), engine.block_manager
        assert stats.kv_cache_usage == bm.num_used_blocks / bm.num_blocks
        assert stats.num_running == len(engine.core.scheduler.running) <= 64
        seen.append((stats.num_running, stats.kv_cache_usage))

    outputs = run(engine, arrivals, on_step=watch)
    assert max(n for n, _ in seen) > 1 and 0 < max(u for _, u in seen) <= 1
    ties = check_all(model, outputs, prompts)
    assert ties <= 2, f"{ties} near-ties: the test model's logits are not well separated"
    stats = engine.stats()
    assert stats.num_preemptions == 0 and stats.num_finished == 32
    assert stats.num_output_tokens == sum(p.max_tokens for _, p in prompts.values())
    assert_pool_whole(engine)


@pytest.mark.parametrize(
    "num_blocks, budget, max_prompt, max_new",
    [(40, 512, 300, 40), (12, 128, 100, 80)],  # 640 and 192 tokens of KV for 32 requests
)
def test_small_pool_preempts_and_outputs_stay_identical(
    model, num_blocks: int, budget: int, max_prompt: int, max_new: int
) -> None:
    engine = make_engine(model, num_blocks=num_blocks, max_num_batched_tokens=budget)
    shape = dict(max_steps=20, max_prompt=max_prompt, max_new=max_new)
    arrivals, prompts = random_requests(seed=2, **shape)
    outputs = run(engine, arrivals)
    check_all(model, outputs, prompts)
    stats = engine.stats()
    assert stats.num_preemptions > 0
    print(
        f"{num_blocks} blocks: {stats.num_preemptions} preemptions, "
        f"{stats.prefix_cache_hit_tokens} prefix-hit tokens, {stats.num_steps} steps"
    )
    assert_pool_whole(engine)
    # Seeded sampling too: preemption and recompute do not change a request's tokens.
    arrivals, prompts = random_requests(seed=2, sampled=True, **shape)
    small = run(make_engine(model, num_blocks=num_blocks, max_num_batched_tokens=budget), arrivals)
    ample = run(make_engine(model, num_blocks=512), arrivals)
    assert {r: tokens_of(o) for r, o in small.items()} == {
        r: tokens_of(o) for r, o in ample.items()
    }


def test_shared_prefix_is_prefilled_once(model) -> None:
    engine = make_engine(model, num_blocks=256)
    rng = random.Random(3)
    prefix = [rng.randrange(97) for _ in range(200)]  # 12 full blocks of 16 = 192 tokens
    prompts = {
        f"p{i}": (prefix + [rng.randrange(97) for _ in range(1 + i)], greedy(8)) for i in range(8)
    }
    # Half arrive together (hits on blocks keyed in the same step), half later.
    arrivals = {0: [], 5: []}
    for i, (request_id, (prompt, params)) in enumerate(prompts.items()):
        arrivals[0 if i < 4 else 5].append((request_id, prompt, params))
    outputs = run(engine, arrivals)
    check_all(model, outputs, prompts)
    assert [outputs[r][-1].num_cached_tokens for r in prompts] == [0] + [192] * 7
    assert engine.stats().prefix_cache_hit_tokens == 7 * 192
    total = sum(len(p) for p, _ in prompts.values()) + sum(
        p.max_tokens - 1 for _, p in prompts.values()
    )
    assert engine.stats().num_batched_tokens == total - 7 * 192
    assert_pool_whole(engine)


def test_prompt_over_the_context_fails_alone(model) -> None:
    engine = make_engine(model, num_blocks=64, max_model_len=128)
    ok_prompt = list(range(50))
    arrivals = {0: [("long", list(range(90)) * 2, greedy(4)), ("ok", ok_prompt, greedy(6))]}
    outputs = run(engine, arrivals)
    (failed,) = outputs["long"]
    assert failed.finished and failed.finish_reason == "error"
    assert "180 tokens" in failed.error and "128" in failed.error
    check_greedy(model, ok_prompt, tokens_of(outputs["ok"]))
    assert outputs["ok"][-1].finish_reason == "length"
    assert_pool_whole(engine)


def test_aborts_at_random_moments_leave_the_pool_whole(model) -> None:
    engine = make_engine(model, num_blocks=48, max_num_batched_tokens=128)
    arrivals, prompts = random_requests(seed=4, n=24, max_steps=30)
    rng = random.Random(5)
    abort_at = {request_id: rng.randrange(60) for request_id in list(prompts)[::2]}

    def maybe_abort(step: int) -> None:
        for request_id, when in abort_at.items():
            if when == step:
                engine.abort_request(request_id)

    outputs = run(engine, arrivals, on_step=maybe_abort)
    aborted = {r for r, outs in outputs.items() if outs[-1].finish_reason == "abort"}
    assert aborted, "no abort hit a live request"
    for request_id, (prompt, params) in prompts.items():
        generated = tokens_of(outputs[request_id])
        if request_id in aborted:
            assert len(generated) < params.max_tokens
            if generated:
                check_greedy(model, prompt, generated)
        else:
            assert len(generated) == params.max_tokens
            check_greedy(model, prompt, generated)
    assert engine.stats().num_aborted == len(aborted)
    assert_pool_whole(engine)


def test_a_llama_model_is_served_through_the_same_narrow_interface() -> None:
    """Grouped-query attention (2 K/V heads), untied head: the engine only uses config
    fields, forward, compute_logits and KVCache.allocate."""
    from palm_serve.model.llama import Llama
    from palm_serve.model.llama_config import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        dim=32,
        depth=2,
        heads=4,
        n_kv_heads=2,
        dim_head=8,
        ff_inner=64,
        max_positions=512,
    )
    llama = Llama(config).eval().requires_grad_(False)
    engine = make_engine(llama, num_blocks=24, max_num_batched_tokens=128)
    arrivals, prompts = random_requests(seed=6, n=12, max_prompt=150, max_steps=10, max_new=30)
    outputs = run(engine, arrivals)
    check_all(llama, outputs, prompts)
    assert engine.stats().num_preemptions > 0
    assert_pool_whole(engine)


def test_decode_steps_run_on_decode_threads_and_prompt_steps_on_all(model):
    """EngineConfig.decode_threads: a step with prompt work runs on the core's threads, a
    step of decodes only on decode_threads; outputs equal the dense oracle either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the core's threads, as its placement would set them
    try:
        check_threads_per_step(model)
    finally:
        torch.set_num_threads(before)


def check_threads_per_step(model) -> None:
    engine = make_engine(model, decode_threads=1)
    seen: list[tuple[bool, int]] = []
    execute = engine.core.runner.execute

    def recording(plan, *args, **kwargs):
        result = execute(plan, *args, **kwargs)
        decodes_only = all(it.num_known_tokens == 1 for it in plan.scheduled)
        seen.append((decodes_only, torch.get_num_threads()))
        return result

    engine.core.runner.execute = recording  # type: ignore[method-assign]
    prompts = {f"r{i}": list(range(3 + i, 40 + 7 * i)) for i in range(3)}
    # The third prompt arrives while the first two decode: prompt work between decodes.
    arrivals = {0: [(r, p, greedy(12)) for r, p in list(prompts.items())[:2]]}
    arrivals[5] = [("r2", prompts["r2"], greedy(12))]
    outputs = run(engine, arrivals)
    assert {threads for decodes_only, threads in seen if decodes_only} == {1}
    assert {threads for decodes_only, threads in seen if not decodes_only} == {2}
    assert [d for d, _ in seen].count(False) >= 2
    for rid, prompt in prompts.items():
        check_greedy(model, prompt, tokens_of(outputs[rid]))
    assert_pool_whole(engine)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ab\ud800c", "text: lone surrogate U+D800 at character 2 is not valid Unicode"),
        ("\udfff", "text: lone surrogate U+DFFF at character 0 is not valid Unicode"),
        ("abc", "text: the tokenizer refused the text (NotImplementedError: tests pass token ids)"),
    ],
)
def test_text_the_tokenizer_cannot_take_is_the_texts_fault_naming_the_field(text, message):
    processor = InputProcessor(PieceTokenizer(97), 97, 256)  # its encode refuses every text
    with pytest.raises(InvalidRequestError) as raised:
        processor.tokenize(text, "text")
    assert (str(raised.value), raised.value.param) == (message, "text")
    # Characters around the surrogate range are not surrogates: they reach the tokenizer.
    for fine in ("\ud7ff", "\ue000", "😀"):
        with pytest.raises(InvalidRequestError, match="the tokenizer refused"):
            processor.tokenize(fine, "text")


def test_finishing_requests_counts_each_once_with_its_reason(model) -> None:
    engine = make_engine(model, max_model_len=64)
    for request_id in ("a", "b", "c", "d"):
        engine.add_request(request_id, [1, 2, 3], greedy(50))
    engine.step()
    core = engine.core
    core.finish_requests(["a", "nobody"], "abort")
    core.finish_requests(["b"], "stop")
    core.finish_requests(["a", "b", "c"], "abort")  # a and b ended already: only c counts
    stats = engine.stats()
    assert (stats.num_finished, stats.num_aborted, stats.num_failed) == (3, 2, 0)
    assert [s.request_id for s in core.scheduler.running] == ["d"]
    assert set(core.seqs) == {"d"}
    # A request the core refused on arrival has ended already (with "error"): finishing it
    # before its output goes out changes neither its reason nor the counts.
    engine.add_request("too long", list(range(64)), greedy(1))
    core.finish_requests(["too long"], "abort")
    [refused] = [o for o in core.step() if o.request_id == "too long"]
    assert refused.finish_reason == "error"
    stats = engine.stats()
    assert (stats.num_finished, stats.num_aborted, stats.num_failed) == (4, 2, 1)


@pytest.mark.parametrize("reason", ["error", "abort"])
def test_finish_all_ends_every_request_and_only_an_error_drops_the_prefix_cache(
    model, reason
) -> None:
    engine = make_engine(model, num_blocks=64, block_size=4)
    engine.add_request("done", list(range(12)), greedy(1))
    run(engine, {})  # "done" finishes: its full blocks stay cached for the prefix
    engine.add_request("a", list(range(12)), greedy(50))
    engine.add_request("b", [5, 6], greedy(50))
    engine.step()
    hits_before = engine.stats().prefix_cache_hit_tokens
    assert hits_before > 0
    outputs = engine.core.finish_all(reason, "why")  # type: ignore[arg-type]
    assert sorted(o.request_id for o in outputs) == ["a", "b"]
    assert all(o.finish_reason == reason and o.error == "why" for o in outputs)
    assert not engine.core.has_unfinished() and engine.block_manager.num_free_blocks == 64
    engine.add_request("again", list(range(12)), greedy(1))
    engine.step()
    got_hits = engine.stats().prefix_cache_hit_tokens > hits_before
    assert got_hits is (reason == "abort")  # K/V a failed step wrote is never reused


def _refusal(call) -> tuple[str, str | None]:
    with pytest.raises(InvalidRequestError) as raised:
        call()
    return str(raised.value), raised.value.param


def test_the_input_processor_refuses_what_cannot_run_naming_field_and_bound() -> None:
    processor = InputProcessor(PieceTokenizer(97), 97, 16)
    make, tokenize = processor.make_request, processor.tokenize
    assert _refusal(lambda: make([], greedy(1))) == (
        "prompt is empty (it encodes to no tokens)",
        "prompt",
    )
    assert _refusal(lambda: make(list(range(16)), greedy(1))) == (
        "prompt has 16 tokens, more than the model's context length of 16 tokens allows "
        "(at most 15 prompt tokens)",
        "prompt",
    )
    assert _refusal(lambda: make(list(range(10)), greedy(7))) == (
        "prompt (10 tokens) + max_tokens (7) = 17 exceeds the model's context length of 16 "
        "tokens; lower max_tokens to at most 6",
        "max_tokens",
    )
    assert _refusal(lambda: make([1], greedy(1, stop_token_ids=(96, 97, -1)))) == (
        "stop_token_ids [97, -1] are outside the vocabulary [0, 97)",
        "stop_token_ids",
    )
    assert _refusal(lambda: make([1], {"max_tokens": 1})) == (  # type: ignore[arg-type]
        "params must be SamplingParams, got dict",
        None,
    )
    assert _refusal(lambda: tokenize([])) == ("prompt is empty (it encodes to no tokens)", "prompt")
    assert _refusal(lambda: tokenize([1, "2"], "input")) == (  # type: ignore[list-item]
        "input must be a string or a list of token ids",
        "input",
    )
    assert _refusal(lambda: tokenize([True, 1]))[1] == "prompt"  # a bool is not a token id
    assert _refusal(lambda: tokenize(list(range(90, 100)) + [-3, 500])) == (
        "prompt: token id(s) [97, 98, 99, -3, 500] are outside the vocabulary [0, 97)",
        "prompt",
    )
    assert _refusal(lambda: tokenize(list(range(97, 104))))[0].startswith(
        "prompt: token id(s) [97, 98, 99, 100, 101] are"  # the first 5 of 7
    )


def test_what_fits_exactly_is_accepted() -> None:
    processor = InputProcessor(PieceTokenizer(97), 97, 16)
    before = time.monotonic()
    request = processor.make_request(list(range(10)), greedy(6, stop_token_ids=(0, 96)), "r1")
    assert (request.request_id, request.prompt_token_ids) == ("r1", list(range(10)))
    assert before <= request.arrival_time <= time.monotonic()
    assert len(processor.make_request(list(range(15)), greedy(1)).request_id) == 32  # a uuid
    assert processor.tokenize([0, 96]) == [0, 96]


def test_stats_count_the_running_and_the_waiting(model) -> None:
    engine = make_engine(model, max_num_seqs=2)
    for request_id in ("a", "b", "c", "d", "e"):
        engine.add_request(request_id, [1, 2, 3], greedy(20))
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (2, 3)
    assert 0 < stats.kv_cache_usage < 1


def test_the_core_counts_steps_prompt_tokens_and_failures(model) -> None:
    engine = make_engine(model, max_model_len=64)
    engine.add_request("too long", list(range(64)), greedy(1))
    assert engine.core.has_unfinished()  # a refused request still owes its last output
    engine.add_request("also too long", list(range(70)), greedy(1))
    engine.add_request("a", [1, 2, 3], greedy(2))
    engine.add_request("b", [4, 5], greedy(2))
    outputs = run(engine, {})
    stats = engine.stats()
    assert (stats.num_steps, stats.prompt_tokens, stats.num_failed) == (2, 5, 2)
    assert outputs["too long"][-1].error == (
        "prompt has 64 tokens; the context length (max_model_len) is 64, so at most 63 fit"
    )


def test_outputs_carry_when_the_core_first_scheduled_the_request(model) -> None:
    engine = make_engine(model)
    engine.add_request("a", [1, 2, 3], greedy(3), arrival_time=time.monotonic())
    outs = run(engine, {})["a"]
    first = outs[0].first_scheduled_time
    assert first is not None and outs[0].arrival_time <= first <= outs[-1].time
    assert all(o.first_scheduled_time == first for o in outs)


def test_prompt_logprobs_come_once_with_the_first_output(model) -> None:
    engine = make_engine(model)
    engine.add_request("a", [1, 2, 3, 4], greedy(4, prompt_logprobs=1))
    engine.add_request("b", [5, 6], greedy(3))
    core_outputs: dict[str, list] = {"a": [], "b": []}
    while engine.core.has_unfinished():
        for out in engine.core.step():
            core_outputs[out.request_id].append(out.prompt_logprobs)
    first, *rest = core_outputs["a"]
    assert first is not None and len(first) == 4 and first[0] is None
    assert rest and all(p is None for p in rest)
    assert all(p is None for p in core_outputs["b"])


def test_finishing_a_request_without_a_reason_is_an_abort(model) -> None:
    engine = make_engine(model)
    engine.add_request("a", [1, 2, 3], greedy(50))
    engine.step()
    engine.core.finish_requests(["a"])
    assert engine.stats().num_aborted == 1
