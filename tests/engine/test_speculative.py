"""n-gram speculative decoding: the proposer's matches, the block accounting of drafts,
and outputs equal to decoding without drafts: greedy (context-dependent tiny models and
the default model, with preemption, prefix hits, stop rules, logprobs) and seeded
sampling (token for token, and a chi-square test of the first tokens' distribution)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import palm_serve.model
from palm_serve.engine.block_manager import BlockManager
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.draft_policy import DraftPolicy
from palm_serve.engine.ngram_proposer import NgramProposer
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.engine.scheduler import Scheduler
from palm_serve.model import load_model

import engine_helpers
from engine_helpers import (
    PieceTokenizer,
    assert_pool_whole,
    check_greedy,
    check_same_logprobs,
    greedy,
    make_context_model,
    make_engine,
    make_request,
    run,
    text_of,
    tokens_of,
)

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread

SPECULATE = dict(speculative_ngram=True, speculative_max_running=10_000)


@pytest.fixture(scope="module")
def model():
    return make_context_model()


# ---- the proposer ------------------------------------------------------------------------


def test_the_longest_ngram_match_wins() -> None:
    p = NgramProposer(1, 3)
    # Suffix (7, 8, 9) occurs at 0; the bigram (8, 9) alone also occurs at 5 (later).
    tokens = [7, 8, 9, 1, 2, 8, 9, 3, 4, 7, 8, 9]
    assert p.propose(tokens, 2) == [1, 2]
    assert NgramProposer(1, 2).propose(tokens, 2) == [3, 4]
    assert p.propose([5, 6, 7], 3) == []  # no earlier occurrence
    assert p.propose(tokens, 0) == []


def test_the_latest_match_with_a_full_draft_else_the_earliest() -> None:
    p = NgramProposer(1, 1)
    # 5 occurs at 0 (followed by 1, 2, 3) and at 4 (followed by 9 and the suffix 5).
    assert p.propose([5, 1, 2, 3, 5, 9, 5], 2) == [9, 5]
    assert p.propose([5, 1, 2, 3, 5, 9, 5], 3) == [1, 2, 3]
    # A loop of period 2 shorter than the draft: a full draft, not one period.
    assert p.propose([4, 6, 4, 6, 4, 6, 4], 4) == [6, 4, 6, 4]


def test_every_ngram_length_from_the_longest_down_is_tried() -> None:
    # Only the unigram 3 recurs (at 2): the bigram (9, 3) does not.
    assert NgramProposer(1, 2).propose([1, 2, 3, 9, 3], 2) == [9, 3]
    assert NgramProposer(1, 4).propose([1, 2, 3, 9, 3], 2) == [9, 3]
    # A run of one token: the longest n-gram, the whole run but its last token, matches first.
    assert NgramProposer(1, 4).propose([5, 5, 5, 5], 3) == [5]


def test_ngram_bounds_out_of_order_are_refused_naming_both() -> None:
    for low, high in [(0, 2), (3, 2)]:
        with pytest.raises(
            ValueError, match=f"need 1 <= ngram_min <= ngram_max, got {low}, {high}"
        ):
            NgramProposer(low, high)


# ---- block accounting ----------------------------------------------------------------------


def speculating_scheduler(num_blocks: int = 16) -> Scheduler:
    config = EngineConfig(num_blocks=num_blocks, block_size=4, num_speculative_tokens=4)
    bm = BlockManager(num_blocks, 4)
    return Scheduler(config, bm, 10_000, None, DraftPolicy(config, 10_000))


def test_draft_slots_are_reserved_then_released_and_never_keyed() -> None:
    sched = speculating_scheduler()
    bm = sched.block_manager
    seq = make_request("a", [1, 2, 3] * 3, greedy(20))
    sched.add(seq)
    sched.update(sched.schedule(), [[1]])  # blocks 0, 1, 2; 0 and 1 full and keyed
    plan = sched.schedule()
    (item,) = plan.scheduled
    # The last 3 tokens (2, 3, 1) occurred at 1: what followed there is the draft.
    assert (item.start, item.draft, item.num_new_tokens) == (9, [2, 3, 1, 2], 5)
    assert plan.num_batched_tokens == 5 and plan.num_draft_tokens == 4
    # Positions 9..13: a new block 3 for drafts only; neither 2 nor 3 is keyed.
    assert seq.block_table == [0, 1, 2, 3]
    assert [bm.blocks[b].key is not None for b in seq.block_table] == [True, True, False, False]
    # The target accepts 2 and 3, then says 9: positions 9..11 are computed, 12 is not.
    sched.update(plan, [[2, 3, 9]])
    assert seq.token_ids[9:] == [1, 2, 3, 9] and seq.num_computed_tokens == 12
    # Block 2 is full of accepted tokens and keyed by them; block 3 (drafts only) is free
    # and first in line for reuse.
    assert seq.block_table == [0, 1, 2]
    assert bm.blocks[2].key == (seq.block_hashes[1], (3, 1, 2, 3))
    assert bm.blocks[3].key is None and next(iter(bm.free_queue)) == 3
    assert bm.num_used_blocks == 3
    assert (sched.num_draft_tokens, sched.num_accepted_draft_tokens) == (4, 2)


def test_a_draft_that_does_not_fit_is_dropped_before_anyone_is_preempted() -> None:
    sched = speculating_scheduler(num_blocks=2)
    seq = make_request("a", [1, 2, 3, 1, 2, 3], greedy(20))
    sched.add(seq)
    sched.update(sched.schedule(), [[1]])
    assert sched.draft_policy.draft(seq, 1, 100) == [2, 3, 1]  # would need a third block
    plan = sched.schedule()
    assert [(s.draft, s.num_new_tokens) for s in plan.scheduled] == [([], 1)]
    assert not plan.preempted and sched.num_preemptions == 0


def decoding(prompt: list[int], params: SamplingParams):
    """A sequence whose last token is due a decode (the rest computed)."""
    seq = make_request("a", prompt, params)
    seq.num_computed_tokens = len(prompt) - 1
    return seq


def test_drafts_stay_within_the_budget_max_tokens_and_context() -> None:
    config = EngineConfig(num_speculative_tokens=4)
    seq = decoding([1, 2, 3] * 3 + [1], greedy(3))
    seq.token_ids += [2]  # one token generated: 2 more allowed, the last one not a draft
    seq.num_computed_tokens += 1
    assert DraftPolicy(config, 10_000).draft(seq, 1, 100) == [3]
    seq = decoding([1, 2, 3] * 3 + [1], greedy(100))
    assert DraftPolicy(config, 10_000).draft(seq, 1, 3) == [2, 3]
    assert DraftPolicy(config, 12).draft(seq, 1, 100) == [2]
    running = config.speculative_max_running  # drafts up to and including this many
    assert DraftPolicy(config, 10_000).draft(seq, running, 100) == [2, 3, 1, 2]
    assert DraftPolicy(config, 10_000).draft(seq, running + 1, 100) == []


def test_a_stop_inside_an_accepted_draft_drops_the_rest() -> None:
    sched = speculating_scheduler()
    seq = make_request("a", [1, 2, 3] * 3, greedy(20, stop_token_ids=(3,)))
    sched.add(seq)
    sched.update(sched.schedule(), [[1]])
    plan = sched.schedule()
    assert plan.scheduled[0].draft == [2, 3, 1, 2]
    sched.update(plan, [[2, 3, 1, 2, 3]])
    assert seq.output_token_ids == [1, 2, 3] and seq.finish_reason == "stop"
    assert sched.block_manager.num_used_blocks == 0


# ---- outputs equal decoding without drafts -------------------------------------------------


def repetitive_requests(seed: int, n: int, max_new: int = 40, sampled: bool = False):
    """Prompts of a short random phrase repeated (so drafts are found), at random steps."""
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for i in range(n):
        phrase = [rng.randrange(97) for _ in range(rng.randint(1, 12))]
        prompt = (phrase * rng.randint(1, 6))[: rng.randint(1, 60)]
        max_tokens = rng.randint(1, max_new)
        if sampled:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=20, seed=i)
        else:
            params = greedy(max_tokens, logprobs=2 if i % 3 == 0 else None)
        arrivals.setdefault(rng.randrange(30), []).append((f"r{i}", prompt, params))
    return arrivals


def check_keyed_blocks(engine) -> None:
    """Every block in the prefix cache holds the tokens its key says (no draft's)."""
    bm = engine.block_manager
    for seq in engine.core.scheduler.running:
        for i, block_id in enumerate(seq.block_table):
            key = bm.blocks[block_id].key
            if key is not None:
                assert key[1] == tuple(seq.token_ids[i * 4 : (i + 1) * 4])
                assert (i + 1) * 4 <= seq.num_computed_tokens


def serve_both(model, arrivals, num_blocks=512, **kw):
    """Outputs per request without and with speculation (each engine left whole)."""
    results = []
    for spec in ({}, SPECULATE):
        engine = make_engine(model, num_blocks=num_blocks, block_size=4, **spec, **kw)
        outputs = run(engine, arrivals, on_step=lambda _, e=engine: check_keyed_blocks(e))
        assert_pool_whole(engine)
        results.append((outputs, engine.stats()))
    return results


def test_greedy_tokens_and_logprobs_equal_without_drafts(model) -> None:
    arrivals = repetitive_requests(seed=1, n=40)
    # The same requests again once the first round is done: prefix-cache hits on blocks
    # that drafts were verified in.
    arrivals[200] = [(f"again-{rid}", p, sp) for reqs in arrivals.values() for rid, p, sp in reqs]
    (plain, plain_stats), (spec, stats) = serve_both(model, arrivals)
    assert stats.num_draft_tokens > 500 and stats.num_accepted_draft_tokens > 200
    assert stats.prefix_cache_hit_tokens > 0
    assert stats.num_steps < plain_stats.num_steps
    prompts = {rid: (p, sp) for reqs in arrivals.values() for rid, p, sp in reqs}
    for rid, (prompt, params) in prompts.items():
        got = tokens_of(spec[rid])
        assert got == tokens_of(plain[rid]), rid
        check_greedy(model, prompt, got)
        if params.logprobs is not None:
            check_same_logprobs(spec[rid], plain[rid], got, 1e-4)


def test_greedy_equal_without_drafts_through_preemption(model) -> None:
    # 24 blocks of 4 tokens for up to 40 sequences of up to 100 tokens: constant preemption.
    arrivals = repetitive_requests(seed=2, n=40)
    (plain, _), (spec, stats) = serve_both(model, arrivals, num_blocks=30)
    assert stats.num_preemptions > 10 and stats.num_accepted_draft_tokens > 100
    assert {r: tokens_of(o) for r, o in spec.items()} == {r: tokens_of(o) for r, o in plain.items()}


def test_stop_tokens_and_context_end_inside_drafts(model) -> None:
    rng = random.Random(3)
    arrivals: dict[int, list] = {0: []}
    for i in range(24):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, 8))] * 4
        stops = tuple(rng.sample(range(97), 12))
        params = greedy(60, stop_token_ids=stops, ignore_eos=True)
        arrivals[0].append((f"r{i}", prompt, params))
    (plain, _), (spec, stats) = serve_both(model, arrivals, max_model_len=48)
    assert stats.num_accepted_draft_tokens > 0
    reasons = {o[-1].finish_reason for o in plain.values()}
    assert reasons == {"stop", "length"}
    for rid, outs in plain.items():
        assert tokens_of(spec[rid]) == tokens_of(outs)
        assert spec[rid][-1].finish_reason == outs[-1].finish_reason
        assert spec[rid][-1].stop_reason == outs[-1].stop_reason


def test_stop_strings_inside_drafts(model) -> None:
    """A stop string the front finds inside a step's accepted draft cuts the output there,
    as without drafts (text, tokens, reason)."""
    arrivals = repetitive_requests(seed=6, n=16, max_new=40)
    (unstopped, _), _ = serve_both(model, arrivals)
    pieces = PieceTokenizer(97).pieces
    stopped: dict[int, list] = {}
    for step, reqs in arrivals.items():
        for rid, prompt, params in reqs:
            out = tokens_of(unstopped[rid])
            stop = "".join(pieces[t] for t in out[len(out) // 2 :][:2]) if len(out) > 5 else "@"
            stopped.setdefault(step, []).append((rid, prompt, replace(params, stop=(stop,))))
    (plain, _), (spec, stats) = serve_both(model, stopped)
    assert stats.num_accepted_draft_tokens > 0
    assert sum(o[-1].stop_reason is not None for o in plain.values()) > 8
    for rid, outs in plain.items():
        assert tokens_of(spec[rid]) == tokens_of(outs)
        assert text_of(spec[rid]) == text_of(outs)
        assert (spec[rid][-1].finish_reason, spec[rid][-1].stop_reason) == (
            outs[-1].finish_reason,
            outs[-1].stop_reason,
        )


def test_seeded_sampling_is_the_same_token_for_token(model) -> None:
    # The target's own choice is emitted at every verified row, one uniform per emitted
    # token: the random stream is consumed as without drafts.
    arrivals = repetitive_requests(seed=4, n=32, sampled=True)
    (plain, _), (spec, stats) = serve_both(model, arrivals)
    assert stats.num_accepted_draft_tokens > 50
    assert {r: tokens_of(o) for r, o in spec.items()} == {r: tokens_of(o) for r, o in plain.items()}


def test_default_model_greedy_equal_without_drafts() -> None:
    trained = load_model(Path(palm_serve.model.__file__).parent / "default")
    rng = random.Random(5)
    arrivals = {
        0: [(f"r{i}", [rng.randrange(4096) for _ in range(8)], greedy(40)) for i in range(4)]
    }
    (plain, _), (spec, stats) = serve_both(trained, arrivals)
    assert stats.num_accepted_draft_tokens > 20
    assert {r: tokens_of(o) for r, o in spec.items()} == {r: tokens_of(o) for r, o in plain.items()}


# ---- the distribution of sampled tokens ----------------------------------------------------


def chi_square_p_value(a: list[int], b: list[int]) -> float:
    """Two-sample chi-square test of homogeneity over the values of a and b; categories
    expected fewer than 5 times in either sample are pooled into one."""
    values = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(v), b.count(v)] for v in values], dtype=torch.float64)
    total = counts.sum(dim=1)
    small = total * min(len(a), len(b)) / (len(a) + len(b)) < 5
    counts = torch.cat([counts[~small], counts[small].sum(dim=0, keepdim=True)])
    counts = counts[counts.sum(dim=1) > 0]
    expected = counts.sum(dim=1, keepdim=True) * counts.sum(dim=0) / counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.shape[0] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


def test_sampled_tokens_follow_the_same_distribution() -> None:
    """Tokens 2-4 after a fixed repetitive prompt (token 1 comes from the prefill, before
    any draft), 1200 seeds without drafts against 1200 other seeds with them. Checked by
    hand that it fails for wrong rules: accepting every draft gives p = 0 at token 2, and
    resampling a rejected row from p without removing the draft gives p ~ 3e-9 at token 3."""
    small = make_context_model(seed=1, vocab_size=16)
    prompt = [1, 2, 3, 4] * 6
    n = 1200
    samples = []
    for offset, spec in ((0, {}), (n, SPECULATE)):
        engine = make_engine(small, num_blocks=2048, block_size=4, max_num_seqs=512, **spec)
        params = [SamplingParams(max_tokens=4, temperature=1.5, seed=offset + i) for i in range(n)]
        outputs = run(engine, {0: [(f"s{i}", prompt, p) for i, p in enumerate(params)]})
        assert_pool_whole(engine)
        samples.append([tokens_of(outputs[f"s{i}"]) for i in range(n)])
    assert engine.stats().num_accepted_draft_tokens > n / 2  # drafts were checked and taken
    for position in (1, 2, 3):
        plain = [t[position] for t in samples[0]]
        drafted = [t[position] for t in samples[1]]
        assert len(set(plain)) > 4  # a real distribution, not a near-certain token
        assert chi_square_p_value(plain, drafted) > 1e-3, position
