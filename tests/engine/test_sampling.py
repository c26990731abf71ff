"""Sampling: per-request random streams, filters and penalties against plain references,
logprobs and prompt logprobs against the dense forward's log_softmax."""

from __future__ import annotations

import random

import pytest
import torch

from palm_serve.engine.sampler import apply_penalties, sample_rows, top_k_top_p
from palm_serve.engine.sampling_params import SamplingParams

import engine_helpers
from engine_helpers import (
    assert_pool_whole,
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


def neighbours(rng: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Requests of every kind: greedy, seeded and unseeded sampling, filters, penalties."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5, seed=rng.randrange(1000)),
        dict(temperature=1.3, top_p=0.8, min_p=0.05),
        dict(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
    ]
    return [
        (
            [rng.randrange(97) for _ in range(rng.randint(1, 120))],
            SamplingParams(max_tokens=rng.randint(1, 30), **kinds[i % len(kinds)]),
        )
        for i in range(n)
    ]


def test_seeded_request_is_the_same_alone_and_in_a_batch(model) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(97) for _ in range(40)]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    alone = run(make_engine(model), {0: [("me", prompt, params)]})
    engine = make_engine(model, max_num_batched_tokens=512)
    others = neighbours(rng, 31)
    arrivals = {0: [(f"o{i}", p, sp) for i, (p, sp) in enumerate(others[:20])]}
    arrivals[2] = [("me", prompt, params)] + [
        (f"o{i}", p, sp) for i, (p, sp) in enumerate(others[20:], 20)
    ]
    batched = run(engine, arrivals)
    assert tokens_of(batched["me"]) == tokens_of(alone["me"])
    assert len(tokens_of(alone["me"])) == 24
    reseeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=4321)
    other_seed = run(make_engine(model), {0: [("me", prompt, reseeded)]})
    assert tokens_of(other_seed["me"]) != tokens_of(alone["me"])
    assert_pool_whole(engine)


def test_unseeded_requests_get_their_own_streams(model) -> None:
    prompt, params = [5, 6, 7], SamplingParams(max_tokens=20, temperature=1.0)
    arrivals = {0: [("a", prompt, params), ("b", prompt, params)]}
    first = run(make_engine(model, seed=7), arrivals)
    assert tokens_of(first["a"]) != tokens_of(first["b"])
    again = run(make_engine(model, seed=7), arrivals)  # the engine seed fixes the streams
    assert tokens_of(again["a"]) == tokens_of(first["a"])


def test_sampling_follows_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(4000, 1)
    params = [SamplingParams(temperature=0.7)] * 4000
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    drawn = sample_rows(logits, params, gens)
    freq = torch.bincount(drawn, minlength=5).float() / 4000
    expected = (logits[0] / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.03


def nucleus_reference(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Top-k then top-p by the book: sort, renormalize, keep until the mass reaches top_p."""
    order = row.argsort(descending=True).tolist()
    keep = order[: p.top_k or len(order)]
    probs = row[keep].double().softmax(-1).tolist()
    mass, nucleus = 0.0, []
    for token, prob in zip(keep, probs, strict=True):
        if p.top_p < 1 and mass > p.top_p:  # top_p = 1 keeps all (no rounding)
            break
        nucleus.append(token)
        mass += prob
    return set(nucleus)


@pytest.mark.parametrize("vocab, scale", [(30, 2.0), (1000, 6.0), (1000, 0.5)])
def test_top_k_top_p_min_p_match_a_plain_reference(vocab: int, scale: float) -> None:
    """vocab 1000: peaked rows take the top-256-candidates path, flat rows (scale 0.5, a
    nucleus of hundreds of tokens) the full-sort fallback."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, vocab, generator=gen) * scale
    params = [
        SamplingParams(top_k=1),
        SamplingParams(top_k=7),
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=10, top_p=0.7),
        SamplingParams(),
        SamplingParams(top_p=0.01),
        SamplingParams(top_p=0.95),
    ]
    got = top_k_top_p(logits, params) > float("-inf")
    for row, p in enumerate(params):
        assert set(torch.nonzero(got[row]).flatten().tolist()) == nucleus_reference(logits[row], p)


def test_min_p_keeps_tokens_near_the_top() -> None:
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(0))
    # min-p: only tokens with prob >= min_p * max prob are ever drawn.
    row = logits[:1].repeat(300, 1)
    probs = row[0].softmax(-1)
    drawn = sample_rows(
        row,
        [SamplingParams(min_p=0.3)] * 300,
        [torch.Generator().manual_seed(i) for i in range(300)],
    )
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert set(drawn.tolist()) <= allowed and len(set(drawn.tolist())) > 1


def test_penalties_match_a_plain_reference() -> None:
    from engine_helpers import make_request

    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2)
    seq = make_request("x", [1, 2, 2], params, vocab_size=6)
    seq.token_ids += [2, 3, 3, 3]  # outputs: 2 once, 3 three times
    plain = make_request("y", [1], SamplingParams(), vocab_size=6)
    logits = torch.tensor([[1.0, -1.0, 2.0, -0.5, 0.7, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    got = apply_penalties(logits.clone(), [seq, plain])
    expected = logits[0].tolist()
    counts = {2: 1, 3: 3}
    for t in range(6):
        if t in (1, 2, 3):  # in prompt or output: repetition penalty, sign-aware
            expected[t] = expected[t] / 1.5 if expected[t] > 0 else expected[t] * 1.5
        if t in counts:  # output only: frequency and presence
            expected[t] -= 0.2 * counts[t] + 0.3
    assert torch.allclose(got[0], torch.tensor(expected))
    assert torch.equal(got[1], logits[1])


def test_logprobs_are_the_raw_model_distribution(model) -> None:
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(
        max_tokens=6, temperature=0.8, repetition_penalty=1.2, logprobs=3, seed=3
    )
    outs = run(make_engine(model), {0: [("lp", prompt, params)]})["lp"]
    generated = tokens_of(outs)
    entries = [e for o in outs for e in o.logprobs]
    assert [e.token_id for e in entries] == generated
    with torch.inference_mode():
        dense = model.forward_dense(torch.tensor([prompt + generated[:-1]]))[0, len(prompt) - 1 :]
    ref = dense.float().log_softmax(-1)
    for i, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(ref[i, entry.token_id].item(), abs=1e-4)
        top_vals, top_ids = ref[i].topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_prompt_logprobs_bypass_the_prefix_cache(model, monkeypatch) -> None:
    from palm_serve.engine import model_runner

    monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_ROWS", 5)  # slices of a chunk, too
    rng = random.Random(9)
    prompt = [rng.randrange(97) for _ in range(70)]
    # A small budget prefills in chunks; the first request caches the prompt's blocks.
    engine = make_engine(model, max_num_batched_tokens=24)
    arrivals = {
        0: [("warm", prompt, greedy(2))],
        6: [("ppl", prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))],
        12: [("hit", prompt + [1], greedy(1))],
    }
    outputs = run(engine, arrivals)
    first = outputs["ppl"][0]
    assert first.num_cached_tokens == 0  # needed the logits of every prompt position
    assert outputs["hit"][0].num_cached_tokens == 64  # the cache itself works
    entries = first.prompt_logprobs
    assert entries[0] is None and len(entries) == len(prompt)
    with torch.inference_mode():
        ref = model.forward_dense(torch.tensor([prompt]))[0].float().log_softmax(-1)
    for i in range(1, len(prompt)):
        assert entries[i].token_id == prompt[i]
        assert entries[i].logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in entries[i].top] == ref[i - 1].topk(2).indices.tolist()
    assert all(o.prompt_logprobs is None for o in outputs["ppl"][1:])
    assert_pool_whole(engine)


def test_extreme_admitted_values_sample_defined_tokens() -> None:
    """A temperature below 1e-5 is greedy; a penalty that pushes logits past the float
    range leaves them finite, so sampling draws only among the tokens it boosted."""
    from palm_serve.engine.sampler import Sampler
    from palm_serve.engine.sequence import Sequence

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    logits[:, 7] = 3.0  # token 7 was seen and has a positive logit

    def seq(**params) -> Sequence:
        return Sequence(
            request_id="s",
            prompt_token_ids=[7, 7],
            params=SamplingParams(**params),
            generator=torch.Generator().manual_seed(1),
        )

    tiny = Sampler()(logits.clone(), [seq(temperature=t) for t in (1e-38, 2e-38, 9e-6)])
    assert tiny.token_ids == logits.argmax(dim=-1).tolist()
    penalized = apply_penalties(logits.clone(), [seq(repetition_penalty=1e-300)] * 3)
    assert bool(torch.isfinite(penalized).all())
    drawn = Sampler()(logits.clone(), [seq(temperature=1.0, repetition_penalty=1e-300)] * 3)
    assert drawn.token_ids == [7, 7, 7]


def test_each_row_gets_its_own_number_of_top_logprobs() -> None:
    from palm_serve.engine.sampler import Sampler
    from palm_serve.engine.sequence import Sequence

    logits = torch.randn(2, 30)
    seqs = [
        Sequence(f"r{n}", [1], SamplingParams(temperature=0, logprobs=n), torch.Generator())
        for n in (1, 3)
    ]
    out = Sampler()(logits, seqs)
    assert [len(lp.top) for lp in out.logprobs] == [1, 3]
    reference = logits.log_softmax(-1)
    for row, lp in enumerate(out.logprobs):
        ids = [t for t, _ in lp.top]
        assert ids == reference[row].topk(len(ids)).indices.tolist()


@pytest.mark.parametrize(
    "penalty",
    [dict(frequency_penalty=1.0), dict(presence_penalty=0.5), dict(repetition_penalty=1.5)],
)
def test_each_penalty_alone_is_applied(penalty) -> None:
    """One penalty, the others at their defaults, against the formula written out."""
    from palm_serve.engine.sequence import Sequence

    logits = torch.randn(1, 20) * 3
    seq = Sequence("p", [3, 4], SamplingParams(**penalty), torch.Generator())
    seq.token_ids += [5, 5, 3]  # output 5 twice, 3 once; the prompt has 3 and 4
    expected = logits.clone()[0]
    for token, count in {5: 2, 3: 1}.items():
        expected[token] -= penalty.get("frequency_penalty", 0) * count
        expected[token] -= penalty.get("presence_penalty", 0)
    rep = penalty.get("repetition_penalty", 1.0)
    for token in (3, 4, 5):
        value = expected[token]
        expected[token] = value / rep if value > 0 else value * rep
    torch.testing.assert_close(apply_penalties(logits.clone(), [seq])[0], expected)


def _sequence(prompt: list[int], **params):
    from palm_serve.engine.sequence import Sequence

    return Sequence("s", prompt, SamplingParams(**params), torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "penalty",
    [dict(repetition_penalty=2.0), dict(presence_penalty=1.0), dict(frequency_penalty=1.0)],
)
def test_a_penalty_alone_changes_the_sampled_token(penalty) -> None:
    """Through the Sampler (which decides whether a row is penalized at all): token 5, seen
    once in the output, loses its lead to the unseen token 6; the repetition penalty also
    divides token 4's logit (in the prompt, positive but below 1), so 4 stays below 6."""
    from palm_serve.engine.sampler import Sampler

    logits = torch.zeros(1, 20)
    logits[0, 4], logits[0, 5], logits[0, 6] = 0.9, 1.5, 1.2
    seq = _sequence([3, 4], temperature=0.0, **penalty)
    seq.token_ids.append(5)
    assert Sampler()(logits.clone(), [_sequence([3, 4], temperature=0.0)]).token_ids == [5]
    assert Sampler()(logits.clone(), [seq]).token_ids == [6]


def test_the_bitmask_leaves_the_best_allowed_token_and_its_logprobs() -> None:
    from palm_serve.engine.sampler import Sampler

    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    allowed = torch.ones(2, 40, dtype=torch.bool)
    allowed[0, best[0]] = False  # row 0: its argmax forbidden; row 1: all allowed
    words = [[sum(1 << b for b in range(32) if w * 32 + b < 40 and allowed[r, w * 32 + b])
              for w in range(2)] for r in range(2)]  # fmt: skip
    bitmask = torch.tensor(words, dtype=torch.int64).to(torch.int32)
    seqs = [_sequence([1], temperature=0.0, logprobs=0) for _ in range(2)]
    out = Sampler()(logits.clone(), seqs, bitmask)
    masked = logits.masked_fill(~allowed, float("-inf"))
    assert out.token_ids == masked.argmax(-1).tolist() and out.token_ids[1] == best[1]
    reference = masked.log_softmax(-1)
    for row, entry in enumerate(out.logprobs):
        assert entry.logprob == pytest.approx(reference[row, out.token_ids[row]].item(), abs=1e-5)


@pytest.mark.parametrize("num_top", [0, 1])
def test_a_request_gets_exactly_the_logprobs_it_asked_for(num_top: int) -> None:
    from palm_serve.engine.sampler import Sampler

    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    [entry] = Sampler()(logits, [_sequence([1], temperature=0.0, logprobs=num_top)]).logprobs
    reference = logits[0].log_softmax(-1)
    token = int(logits.argmax())
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(reference[token].item(), abs=1e-6)
    assert [t for t, _ in entry.top] == [token][:num_top]


def test_draw_takes_the_first_token_past_the_target_never_a_zero_one() -> None:
    from palm_serve.engine.sampler import draw

    cdf = torch.tensor([[0.0, 0.5, 0.5, 1.0], [1.0, 2.0, 2.0, 4.0]])  # row 1: unnormalized
    assert draw(cdf, torch.tensor([0.0, 0.0])).tolist() == [1, 0]
    assert draw(cdf, torch.tensor([0.5, 0.5])).tolist() == [3, 3]
    assert draw(cdf, torch.tensor([0.4, 0.3])).tolist() == [1, 1]


def test_finite_clamps_overflow_and_keeps_filtered_tokens_out() -> None:
    from palm_serve.engine.sampler import finite

    top = torch.finfo(torch.float32).max
    got = finite(torch.tensor([float("nan"), float("inf"), float("-inf"), 1.5]))
    assert got.tolist() == [-top, top, float("-inf"), 1.5]


def test_top_k_alone_and_min_p_limit_each_row_to_its_own_candidates() -> None:
    """top_k = 1 is the argmax; top_k = 3 alone draws among three; min-p compares each row
    with its own most likely token (row 1 is flat over 4 tokens, row 0 peaked)."""
    n = 200
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(2)).repeat(n, 1)
    top1 = sample_rows(logits, [SamplingParams(top_k=1)] * n, gens)
    assert set(top1.tolist()) == {int(logits[0].argmax())}
    top3 = set(sample_rows(logits, [SamplingParams(top_k=3)] * n, gens).tolist())
    assert top3 == set(logits[0].topk(3).indices.tolist())
    rows = torch.full((2, 8), float("-inf"))
    rows[0, :] = torch.tensor([9.0, 0, 0, 0, 0, 0, 0, 0])
    rows[1, :4] = 0.0
    drawn = [sample_rows(rows, [SamplingParams(min_p=0.5)] * 2, [g, g])[1].item() for g in gens]
    assert set(drawn) == {0, 1, 2, 3}
    only_top = sample_rows(logits[:50], [SamplingParams(min_p=1.0)] * 50, gens[:50])
    assert set(only_top.tolist()) == {int(logits[0].argmax())}
