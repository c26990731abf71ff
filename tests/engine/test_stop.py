"""Finishing: stop strings across token boundaries (cut exactly, never emitted, held back
while undecided), stop token ids, EOS and ignore_eos, max_tokens."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm_serve.engine.messages import EngineCoreOutput, EngineCoreRequest
from palm_serve.engine.output_processor import OutputProcessor
from palm_serve.engine.outputs import TokenLogprob
from palm_serve.engine.stop_checker import StopChecker
from palm_serve.model.tokenizer import ByteTokenizer, IncrementalDetokenizer

import engine_helpers
from engine_helpers import (
    PieceTokenizer,
    assert_pool_whole,
    greedy,
    make_context_model,
    make_engine,
    run,
    text_of,
    tokens_of,
)

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread

PROMPT = [10, 20, 30, 40, 50, 60, 70]


@pytest.fixture(scope="module")
def model():
    return make_context_model()


@pytest.fixture(scope="module")
def free_run(model) -> tuple[list[int], str]:
    """Greedy tokens and text of PROMPT with no stop condition but max_tokens."""
    outs = run(make_engine(model), {0: [("free", PROMPT, greedy(40))]})["free"]
    return tokens_of(outs), text_of(outs)


def token_spans(tokenizer: PieceTokenizer, tokens: list[int]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for t in tokens:
        spans.append((at, at + len(tokenizer.pieces[t])))
        at += len(tokenizer.pieces[t])
    return spans


def test_stop_checker_holds_back_a_possible_stop_string() -> None:
    tok = PieceTokenizer(97)
    checker = StopChecker(IncrementalDetokenizer(tok, []), ("b1c", "zz"))
    assert checker.add_token(0) is None and checker.take_text(False) == "a"  # "a"
    assert checker.add_token(1) is None and checker.take_text(False) == ""  # "ab": "b" held
    assert checker.add_token(53) is None and checker.take_text(False) == "bb2"  # "b2": no
    assert checker.add_token(25) is None and checker.take_text(False) == ""  # "z" held
    assert checker.add_token(27) is None and checker.take_text(False) == "z"  # "b1" held
    assert checker.add_token(2) == "b1c"  # "...b1" + "c" completes "b1c"
    assert checker.take_text(True) == ""
    assert checker.emitted == len(checker.text)  # nothing left to emit: "abb2z" went out


@pytest.mark.parametrize("span", [2, 3])
def test_stop_string_across_tokens_is_cut_exactly(model, free_run, span: int) -> None:
    tokens, text = free_run
    tok = PieceTokenizer(97)
    spans = token_spans(tok, tokens)
    # A stop string from inside token k-th's piece to inside the piece span - 1 tokens later.
    rng = random.Random(span)
    for _ in range(100):
        k = rng.randrange(3, len(tokens) - span)
        start = rng.randrange(*spans[k])
        end = rng.randrange(spans[k + span - 1][0], spans[k + span - 1][1]) + 1
        stop = text[start:end]
        if end - start > 1 and text.find(stop) == start:  # its first occurrence
            break
    engine = make_engine(model)
    params = greedy(40, stop=("never-there", stop))
    outs = run(engine, {0: [("s", PROMPT, params)]})["s"]
    assert text_of(outs) == text[:start]
    last = outs[-1]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    # Generation ends with the token that completed the stop string.
    assert tokens_of(outs) == tokens[: k + span]
    # Streamed: no increment ever carried part of the stop string.
    assert len(outs) > 2 and all(stop not in o.new_text for o in outs)
    assert_pool_whole(engine)


def test_eos_stops_unless_ignored(free_run) -> None:
    tokens, text = free_run
    k = 12
    eos = tokens[k]
    first = tokens.index(eos)
    model = make_context_model(eos_token_id=eos)  # same seed: same weights
    outs = run(make_engine(model), {0: [("e", PROMPT, greedy(40))]})["e"]
    assert tokens_of(outs) == tokens[: first + 1]  # EOS counted as generated...
    tok = PieceTokenizer(97)
    assert text_of(outs) == tok.decode(tokens[:first])  # ...but its text is not emitted
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason is None
    ignored = run(make_engine(model), {0: [("i", PROMPT, greedy(40, ignore_eos=True))]})["i"]
    assert tokens_of(ignored) == tokens and ignored[-1].finish_reason == "length"
    assert text_of(ignored) == text


def test_stop_token_ids_and_max_tokens(model, free_run) -> None:
    tokens, _ = free_run
    stop_id = tokens[9]
    first = tokens.index(stop_id)
    outputs = run(
        make_engine(model),
        {0: [("t", PROMPT, greedy(40, stop_token_ids=(stop_id,))), ("m", PROMPT, greedy(5))]},
    )
    assert tokens_of(outputs["t"]) == tokens[: first + 1]
    assert outputs["t"][-1].finish_reason == "stop" and outputs["t"][-1].stop_reason == stop_id
    assert tokens_of(outputs["m"]) == tokens[:5] and outputs["m"][-1].finish_reason == "length"
    assert outputs["m"][-1].num_output_tokens == 5


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 96), min_size=1, max_size=30),
    stops=st.lists(st.text(alphabet="abc12", min_size=1, max_size=5), max_size=4),
)
def test_stop_checker_emits_exactly_the_text_before_the_first_stop(tokens, stops) -> None:
    tok = PieceTokenizer(97)
    checker = StopChecker(IncrementalDetokenizer(tok, []), tuple(stops))
    emitted, hit = "", None
    for t in tokens:
        hit = checker.add_token(t)
        emitted += checker.take_text(final=hit is not None)
        if hit is not None:
            break
    else:
        checker.flush()
        emitted += checker.take_text(final=True)
    full = tok.decode(tokens)
    firsts = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if firsts:
        # The stop string completed first (by its end) wins; output is cut at its start.
        end, start, _ = min(firsts)
        assert hit is not None and (full.find(hit) + len(hit), full.find(hit)) == (end, start)
        assert emitted == full[:start]
        assert all(s not in emitted for s in stops)
    else:
        assert hit is None and emitted == full


@pytest.mark.parametrize("stops", [(), ("!!", "?a?")])
def test_the_checker_keeps_no_more_text_than_a_stop_string_needs(stops) -> None:
    """Over a long output, the text kept is the held-back part and the tail a stop string
    could begin in, never the whole output (which made every token cost its length)."""
    tok = PieceTokenizer(97)
    checker = StopChecker(TextPieces(tok.pieces), stops)
    longest = max((len(s) for s in stops), default=0)
    emitted = []
    for t in [i * 7 % 97 for i in range(3000)]:
        assert checker.add_token(t) is None
        emitted.append(checker.take_text(final=False))
        assert len(checker.text) <= 2 * max(longest - 1, 0)
    emitted.append(checker.take_text(final=True))
    assert "".join(emitted) == "".join(tok.pieces[i * 7 % 97] for i in range(3000))


class TextPieces:
    """A detokenizer stand-in: token i is pieces[i]; flush releases `held` (what a real one
    holds back at the end, e.g. an incomplete UTF-8 character)."""

    def __init__(self, pieces: list[str], held: str = "") -> None:
        self.pieces, self.held = pieces, held

    def add(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        return self.held


def test_a_piece_holding_a_stop_string_twice_is_cut_at_the_first() -> None:
    checker = StopChecker(TextPieces(["say", " x.y.z"]), (".",))
    assert checker.add_token(0) is None
    assert checker.add_token(1) == "."
    assert checker.take_text(True) == "say x"


def test_flush_releases_the_held_back_text_and_checks_it_for_stops() -> None:
    checker = StopChecker(TextPieces(["ab"], held="c!d"), ("!",))
    assert checker.add_token(0) is None
    assert checker.flush() == "!"
    assert checker.take_text(True) == "abc"


def test_the_front_ends_a_request_once_with_its_reason_and_error() -> None:
    """The front's own ends (a caller's abort, a dead core): one last output each, empty,
    carrying the reason and the core's message; nothing for a request already over."""
    processor = OutputProcessor(PieceTokenizer(97))
    for request_id, prompt in (("a", [1, 2]), ("b", [1]), ("c", [4])):
        processor.add_request(EngineCoreRequest(request_id, prompt, greedy(5), 0.0))
    assert processor.has_unfinished()
    [first] = processor.process([EngineCoreOutput("a", [3])]).outputs
    assert (first.new_text, first.finished) == ("d", False)
    aborted = processor.finish("a", "abort")
    assert aborted is not None
    assert (aborted.request_id, aborted.finished, aborted.finish_reason) == ("a", True, "abort")
    assert (aborted.new_token_ids, aborted.new_text, aborted.error) == ([], "", None)
    assert processor.finish("a", "abort") is None  # over already
    assert processor.finish("nobody", "abort") is None
    dead = processor.finish_all("error", "core died")
    assert sorted(o.request_id for o in dead) == ["b", "c"]
    assert all(o.finished and (o.finish_reason, o.error) == ("error", "core died") for o in dead)
    assert not processor.has_unfinished() and processor.finish_all("abort") == []


def test_the_front_reports_the_requests_it_stopped_and_skips_late_tokens() -> None:
    """A stop string ends a request in the front: the core must be told (stopped); tokens
    the core sent before it heard are dropped, and the rest of the batch still goes out."""
    processor = OutputProcessor(PieceTokenizer(97))
    processor.add_request(EngineCoreRequest("a", [1], greedy(9, stop=["d"]), 0.0))
    processor.add_request(EngineCoreRequest("b", [1], greedy(9), 0.0))
    step = processor.process([EngineCoreOutput("a", [3]), EngineCoreOutput("b", [4])])
    assert step.stopped == ["a"]
    assert [(o.request_id, o.finished, o.finish_reason) for o in step.outputs] == [
        ("a", True, "stop"),
        ("b", False, None),
    ]
    late = processor.process([EngineCoreOutput("a", [5]), EngineCoreOutput("b", [6])])
    assert late.stopped == [] and [o.request_id for o in late.outputs] == ["b"]
    # A request the core itself finished is not reported back to it.
    done = processor.process([EngineCoreOutput("b", [7], finish_reason="length")])
    assert done.stopped == [] and done.outputs[0].finish_reason == "length"


def _byte_processor(stop: list[str]) -> OutputProcessor:
    processor = OutputProcessor(ByteTokenizer(257))  # 256 is EOS
    processor.add_request(EngineCoreRequest("r", [1], greedy(9, stop=stop, logprobs=0), 0.0))
    return processor


def _logprobs(ids: list[int]) -> list[TokenLogprob]:
    return [TokenLogprob(token_id=t, logprob=-float(k)) for k, t in enumerate(ids)]


def test_a_stop_string_inside_a_multi_token_output_cuts_tokens_and_logprobs() -> None:
    """Several tokens in one step (verified drafts): the stop string completes at the
    second token, so the output ends there, its logprobs too."""
    processor = _byte_processor(["bc"])
    ids = [ord(c) for c in "abcde"]
    [out] = processor.process([EngineCoreOutput("r", ids, logprobs=_logprobs(ids))]).outputs
    assert (out.new_token_ids, out.new_text) == (ids[:3], "a")
    assert (out.finish_reason, out.stop_reason) == ("stop", "bc")
    assert out.logprobs == _logprobs(ids)[:3]


@pytest.mark.parametrize("reason", ["length", "stop"])
def test_a_stop_string_completed_by_the_final_flush_ends_with_stop(reason: str) -> None:
    """An incomplete character held back to the end comes out as U+FFFD: a stop string
    it completes is found, whether the request ended by length or by EOS."""
    processor = _byte_processor(["\ufffd"])
    ids = [0x61, 0xC3] + ([256] if reason == "stop" else [])
    [out] = processor.process([EngineCoreOutput("r", ids, finish_reason=reason)]).outputs
    assert (out.finish_reason, out.stop_reason) == ("stop", "\ufffd")
    assert out.new_text == "a"


def test_eos_ends_a_multi_token_output_without_text_of_its_own() -> None:
    processor = _byte_processor([])
    ids = [ord(c) for c in "xyz"] + [256]
    [out] = processor.process([EngineCoreOutput("r", ids, finish_reason="stop")]).outputs
    assert (out.new_text, out.new_token_ids, out.stop_reason) == ("xyz", ids, None)


def test_the_first_token_time_is_that_of_the_first_output_with_a_token() -> None:
    processor = _byte_processor([])
    [empty] = processor.process([EngineCoreOutput("r", [])]).outputs
    assert empty.first_token_time is None and isinstance(empty.time, float)
    [first] = processor.process([EngineCoreOutput("r", [0x61])]).outputs
    assert first.first_token_time == first.time
    [later] = processor.process([EngineCoreOutput("r", [0x62])]).outputs
    assert later.first_token_time == first.time < later.time


class SpacedPieces:
    """A decoder that drops the space that starts a text (as sentencepiece's does): a
    token's text depends on what came before it."""

    eos_token_id, bos_token_id = None, None
    pieces = ["x", " y", " z"]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids).removeprefix(" ")


def test_the_first_tokens_text_is_decoded_in_the_context_of_the_prompt() -> None:
    processor = OutputProcessor(SpacedPieces())  # type: ignore[arg-type]
    processor.add_request(EngineCoreRequest("r", [0], greedy(4), 12.5))
    [out] = processor.process([EngineCoreOutput("r", [1, 2])]).outputs
    assert out.new_text == " y z"  # after the prompt "x": its space is kept
    assert (out.arrival_time, out.prompt_token_ids, out.num_prompt_tokens) == (12.5, [0], 1)


def test_text_held_back_for_a_stop_string_comes_out_when_the_request_ends() -> None:
    processor = OutputProcessor(PieceTokenizer(97))
    processor.add_request(EngineCoreRequest("r", [1], greedy(2, stop=["bc"]), 0.0))
    [held] = processor.process([EngineCoreOutput("r", [0, 1])]).outputs
    assert held.new_text == "a"  # "b" may start "bc": held back
    [last] = processor.process([EngineCoreOutput("r", [], finish_reason="length")]).outputs
    assert (last.new_text, last.finish_reason) == ("b", "length")
