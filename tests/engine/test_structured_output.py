"""Structured output through the engine with the shipped default model: sampled outputs
(temperature 1.0, many seeds, batches of 32) that finish with "stop" parse and validate
against their JSON schemas (jsonschema), regex and choice outputs match; a request's
tokens do not depend on its batch neighbours or on being preempted; the bitmask is applied
bit for bit; a spec that does not compile is refused by the front and, sent to the core
directly, fails that request alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

import palm_serve.model
from palm_serve.engine import structured_output as structured_output_module
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine
from palm_serve.engine.llm_engine import LLMEngine
from palm_serve.engine.sampling_params import SamplingParams, StructuredOutputSpec
from palm_serve.engine.structured_output import (
    StructuredOutputManager,
    StructuredOutputValidator,
    _CompiledSpecs,
    apply_token_bitmask,
    llg_tokenizer,
)
from palm_serve.model import load_model, load_tokenizer
from palm_serve.model.tokenizer import ByteTokenizer, Tokenizer

from engine_helpers import assert_pool_whole, one_torch_thread, run, text_of, tokens_of  # noqa: F401

MODEL_DIR = Path(palm_serve.model.__file__).parent / "default"

SCHEMAS: list[dict] = [
    {  # nested object, enum, bounded numbers, required and optional keys
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tribe": {"enum": ["Judah", "Levi", "Benjamin"]},
            "home": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "tribe"],
        "additionalProperties": False,
    },
    {  # an array of bounded numbers, with a length range
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "number", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 4,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["scores", "ok"],
        "additionalProperties": False,
    },
    {  # an array of objects, an enum of mixed types, an optional key
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": 99},
                        "tag": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                    },
                    "required": ["id"],
                    "additionalProperties": False,
                },
            },
            "level": {"enum": [1, 2, 3, "max", None]},
        },
        "required": ["items"],
        "additionalProperties": False,
    },
]
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
CHOICES = ("Moses", "Aaron", "the LORD", "Pharaoh")
PROMPTS = ["And the LORD said unto Moses, ", "In the beginning ", "Blessed are the "]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(MODEL_DIR, 4096)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR)


def make_engine(model, tokenizer, **overrides) -> LLMEngine:
    config = EngineConfig(**{"num_blocks": 512, "max_num_seqs": 32, **overrides})
    return build_llm_engine(model, tokenizer, config, seed=0)


def sampled(spec: StructuredOutputSpec, seed: int, max_tokens: int = 120) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, structured_output=spec)


REGEX_DIGITS = StructuredOutputSpec(regex="[0-9]{8}")


def sampled_free(seed: int, max_tokens: int = 20) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)


def json_spec(schema: dict) -> StructuredOutputSpec:
    return StructuredOutputSpec(json_schema=json.dumps(schema))


def test_over_200_sampled_requests_match_their_schemas(model, tokenizer):
    engine = make_engine(model, tokenizer)
    requests: dict[str, tuple[str, object]] = {}
    arrivals = []
    for i in range(216):
        kind = ("json", "json", "json", "regex", "choice")[i % 5] if i < 210 else "object"
        if kind == "json":
            schema = SCHEMAS[i % len(SCHEMAS)]
            spec, check = json_spec(schema), schema
        elif kind == "object":
            spec, check = json_spec({"type": "object"}), {"type": "object"}
        elif kind == "regex":
            spec, check = StructuredOutputSpec(regex=REGEX), REGEX
        else:
            spec, check = StructuredOutputSpec(choice=CHOICES), CHOICES
        prompt = tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        requests[f"r{i}"] = (kind, check)
        arrivals.append((f"r{i}", prompt, sampled(spec, seed=1000 + i)))
    outputs = run(engine, {0: arrivals})
    reasons: dict[str, int] = {}
    for rid, (kind, check) in requests.items():
        outs = outputs[rid]
        reason = outs[-1].finish_reason
        reasons[reason] = reasons.get(reason, 0) + 1
        if reason != "stop":
            continue
        text = text_of(outs)
        if kind in ("json", "object"):
            jsonschema.validate(json.loads(text), check)
        elif kind == "regex":
            assert re.fullmatch(check, text), text
        else:
            assert text in check, text
    # Outputs cut by max_tokens need not parse; the schemas are sized so that few are.
    assert reasons.get("stop", 0) >= 0.95 * len(requests), reasons
    assert set(reasons) <= {"stop", "length"}, reasons
    assert_pool_whole(engine)


def test_output_does_not_depend_on_batch_neighbours_or_preemption(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    me = ("me", prompt, sampled(json_spec(SCHEMAS[0]), seed=7))
    alone = tokens_of(run(make_engine(model, tokenizer), {0: [me]})["me"])
    neighbours = [
        (f"n{i}", tokenizer.encode(PROMPTS[i % 3]), params)
        for i, params in enumerate(
            [sampled(json_spec(SCHEMAS[i % 3]), seed=i) for i in range(8)]
            + [SamplingParams(max_tokens=60, temperature=1.0, seed=50 + i) for i in range(8)]
            + [sampled(StructuredOutputSpec(choice=CHOICES), seed=90 + i) for i in range(4)]
        )
    ]
    batched = run(make_engine(model, tokenizer), {0: neighbours[:10] + [me] + neighbours[10:]})
    assert tokens_of(batched["me"]) == alone
    # A pool so small that sequences are preempted and recomputed while they decode.
    small = make_engine(model, tokenizer, num_blocks=40, block_size=4)
    preempted = run(small, {0: neighbours[:6] + [me]})  # the newest: preempted first
    assert small.core.scheduler.num_preemptions > 0
    assert tokens_of(preempted["me"]) == alone
    assert_pool_whole(small)


def test_a_complete_grammar_ends_the_request_with_stop_and_keeps_its_last_token(model, tokenizer):
    engine = make_engine(model, tokenizer)
    params = [sampled(StructuredOutputSpec(choice=CHOICES), seed=s) for s in range(6)]
    outputs = run(
        engine, {0: [(f"c{i}", tokenizer.encode("Moses"), p) for i, p in enumerate(params)]}
    )
    for outs in outputs.values():
        assert outs[-1].finish_reason == "stop"
        # No EOS was sampled: the grammar ended the request on its last (text) token.
        assert tokenizer.eos_token_id not in tokens_of(outs)
        assert text_of(outs) in CHOICES
        assert tokenizer.decode(tokens_of(outs)) == text_of(outs)


def test_only_the_output_that_completes_the_grammar_says_so(model, tokenizer):
    """The front keeps a request's last token in its text only when the grammar, not a
    stop token, ended it: every earlier output must say it did not."""
    engine = make_engine(model, tokenizer)
    spec = StructuredOutputSpec(choice=("the LORD said unto Moses",))
    engine.add_request("c", tokenizer.encode(PROMPTS[0]), sampled(spec, seed=3))
    flags: list[bool] = []
    while engine.core.has_unfinished():
        flags += [o.grammar_complete for o in engine.core.step() if o.request_id == "c"]
    # Exactly False, not merely falsy: the message crosses to the front typed (msgspec).
    assert len(flags) > 1 and flags == [False] * (len(flags) - 1) + [True]


def test_eos_is_allowed_only_where_the_grammar_can_end(tokenizer):
    manager = StructuredOutputManager(tokenizer, 4096)
    eos = tokenizer.eos_token_id
    grammar = manager.start(StructuredOutputSpec(regex="ab+c?"))

    def eos_allowed() -> bool:
        mask = manager.bitmask([grammar])
        assert mask is not None
        return bool((int(mask[0, eos // 32]) >> (eos % 32)) & 1)

    output: list[int] = []
    assert not eos_allowed()
    for piece, can_end in [("a", False), ("b", True), ("b", True)]:
        output += tokenizer.encode(piece)
        grammar.advance(output)  # the whole output so far: it consumes what is new
        assert eos_allowed() == can_end, output
    grammar.advance(output + [eos])
    assert grammar.is_complete  # EOS consumed: the matcher takes nothing more


def test_sampled_text_under_a_regex_matches_it(model, tokenizer):
    engine = make_engine(model, tokenizer)
    spec = StructuredOutputSpec(regex="[A-Z][a-z]{1,8}( [a-z]{1,8}){0,5}")
    prompts = [tokenizer.encode(PROMPTS[s % 3]) for s in range(12)]
    arrivals = [(f"e{s}", prompts[s], sampled(spec, s, 60)) for s in range(12)]
    for outs in run(engine, {0: arrivals}).values():
        assert outs[-1].finish_reason == "stop"
        assert re.fullmatch(spec.regex, text_of(outs)), text_of(outs)  # type: ignore[arg-type]


def allowed_tokens(mask: torch.Tensor, vocab: int) -> list[int]:
    return [t for t in range(vocab) if (int(mask[0, t // 32]) >> (t % 32)) & 1]


def test_a_byte_level_model_is_allowed_exactly_the_bytes_its_grammar_takes():
    """A model directory without tokenizer.json: llguidance sees id i < 256 as byte i, EOS
    (256) as the special token that ends the grammar, and the ids past it as nothing a
    grammar can take."""
    tokenizer = ByteTokenizer(260)
    manager = StructuredOutputManager(tokenizer, 260)
    grammar = manager.start(StructuredOutputSpec(regex="[ab]é"))
    output: list[int] = []
    for piece, expected in [("", [97, 98]), ("b", [0xC3]), ("\xc3", [0xA9]), ("\xa9", [256])]:
        output += [ord(c) for c in piece]  # raw bytes: é is 0xC3 0xA9 in UTF-8
        grammar.advance(output)
        mask = manager.bitmask([grammar])
        assert mask is not None and allowed_tokens(mask, 260) == expected, output
    seen = llg_tokenizer(tokenizer, 260)
    assert (seen.eos_token, seen.vocab_size) == (256, 260)
    assert [seen.is_special_token(t) for t in (97, 200, 256, 257)] == [False, False, True, False]
    assert seen.tokenize_str("hé") == tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert seen.decode_bytes([104, 0xC3, 0xA9]) == "hé".encode()


def test_the_validator_says_why_a_tokenizer_cannot_constrain_and_passes_a_good_spec():
    spec = StructuredOutputSpec(regex="a+")
    no_eos = StructuredOutputValidator(ByteTokenizer(256), 256).error(spec)
    assert no_eos == "the model's tokenizer has no EOS token, which structured output needs"
    assert StructuredOutputValidator(ByteTokenizer(260), 260).error(spec) is None


def test_a_vocabulary_padded_past_the_tokenizer_never_allows_the_padding(tokenizer):
    """Models pad their embedding past the tokenizer's ids (here 4096 -> 4100): the mask
    covers the model's vocabulary, and no id past the tokenizer's is ever allowed."""
    manager = StructuredOutputManager(tokenizer, 4100)
    grammar = manager.start(StructuredOutputSpec(regex="[a-z ]+"))
    mask = manager.bitmask([grammar])
    assert mask is not None and mask.shape == (1, 129)  # ceil(4100 / 32)
    allowed = allowed_tokens(mask, 4100)
    assert allowed and max(allowed) < 4096


def test_a_spec_is_compiled_once_however_often_it_is_checked(tokenizer, monkeypatch):
    compiled: list[StructuredOutputSpec] = []
    real = _CompiledSpecs._compile

    def counting(self, spec):
        compiled.append(spec)
        return real(self, spec)

    monkeypatch.setattr(_CompiledSpecs, "_compile", counting)
    validator = StructuredOutputValidator(tokenizer, 4096)
    good, bad = StructuredOutputSpec(regex="a+"), StructuredOutputSpec(regex="(")
    for _ in range(3):
        assert validator.error(good) is None and validator.error(bad) is not None
    assert compiled == [good, bad]


def test_the_least_recently_used_spec_is_dropped_past_the_cache_size(tokenizer, monkeypatch):
    monkeypatch.setattr(structured_output_module, "CACHE_SIZE", 3)
    compiled: list[str] = []
    real = _CompiledSpecs._compile

    def counting(self, spec):
        compiled.append(spec.regex)
        return real(self, spec)

    monkeypatch.setattr(_CompiledSpecs, "_compile", counting)
    validator = StructuredOutputValidator(tokenizer, 4096)
    for regex in ["a", "b", "c", "a", "d", "a", "b"]:  # "a" used again before "d" arrives
        assert validator.error(StructuredOutputSpec(regex=regex)) is None
    # Full at 3: "d" drops "b" (least recently used), so only "b" is compiled again.
    assert compiled == ["a", "b", "c", "d", "b"]


def test_the_grammar_ends_on_the_eos_the_engine_uses_not_the_tokenizer_files_guess():
    """Unless told, llguidance guesses the end token from tokenizer.json's special tokens.
    Told ours (here another id than its guess), it allows only ours once the grammar ends."""
    tokenizer = load_tokenizer(MODEL_DIR, 4096)
    tokenizer.eos_token_id = 5  # as a model whose config names another end token
    manager = StructuredOutputManager(tokenizer, 4096)
    grammar = manager.start(StructuredOutputSpec(regex="a"))
    grammar.advance(tokenizer.encode("a"))
    mask = manager.bitmask([grammar])
    assert mask is not None and allowed_tokens(mask, 4096) == [5]


class PieceVocabulary:
    """A tokenizer that is neither bytes nor tokenizers.json: llguidance reads each id's
    decoded text."""

    pieces = ["a", "b", "ab", "ba", "c", "<eos>"]
    eos_token_id, bos_token_id = 5, None

    def encode(self, text: str) -> list[int]:
        return [self.pieces.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids if i != self.eos_token_id)


def test_a_tokenizer_of_its_own_is_allowed_exactly_the_pieces_its_grammar_takes():
    manager = StructuredOutputManager(PieceVocabulary(), 6)  # type: ignore[arg-type]
    grammar = manager.start(StructuredOutputSpec(regex="ab?a"))
    output: list[int] = []
    # "a" then "b" or "a"; "ab" then "a"; "aba" as a, ba; then only EOS.
    for token, expected in [(None, [0, 2]), (0, [0, 1, 3]), (3, [5])]:
        if token is not None:
            output.append(token)
            grammar.advance(output)
        mask = manager.bitmask([grammar])
        assert mask is not None and allowed_tokens(mask, 6) == expected, output


def test_the_bitmask_forbids_exactly_its_zero_bits():
    generator = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partly unused
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=generator)
    logits = torch.randn(3, vocab, generator=generator)
    masked = apply_token_bitmask(logits, bitmask)
    for row in range(3):
        for token in range(vocab):
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            want = logits[row, token] if allowed else float("-inf")
            assert masked[row, token] == want


def test_the_step_bitmask_has_one_row_per_sequence_due(tokenizer):
    manager = StructuredOutputManager(tokenizer, 4096)
    digits = manager.start(StructuredOutputSpec(regex="[0-9]+"))
    mask = manager.bitmask([None, digits, None])
    assert mask is not None and mask.shape == (3, 128)
    assert bool((mask[0] == -1).all()) and bool((mask[2] == -1).all())
    allowed = apply_token_bitmask(torch.zeros(1, 4096), mask[1:2])[0] == 0
    texts = [tokenizer.decode([t]) for t in torch.nonzero(allowed).flatten().tolist()]
    assert texts and all(t.isdigit() for t in texts)
    assert manager.bitmask([None, None]) is None


def test_the_parallel_fill_equals_the_serial_one(tokenizer):
    specs = [json_spec(SCHEMAS[0]), StructuredOutputSpec(regex=REGEX), None]
    specs += [StructuredOutputSpec(choice=CHOICES), None]
    masks = []
    for threads in (1, 2):
        manager = StructuredOutputManager(tokenizer, 4096, num_threads=threads)
        grammars = [manager.start(s) if s is not None else None for s in specs]
        grammars[0].advance(tokenizer.encode('{"name": "Ab'))  # type: ignore[union-attr]
        masks.append(manager.bitmask(grammars))
    assert masks[0] is not None and masks[1] is not None
    assert torch.equal(masks[0], masks[1])
    assert not bool((masks[0][0] == masks[0][1]).all())  # the rows differ: a real check


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (StructuredOutputSpec(json_schema='{"type": "strin"}'), "strin"),
        (StructuredOutputSpec(json_schema="{not json"), "JSON"),
        (StructuredOutputSpec(regex="[0-9]{3}-("), "unclosed group"),
        (StructuredOutputSpec(grammar='start: foo\nfoo: "x" bar'), 'unknown name: "bar"'),
        (StructuredOutputSpec(regex=r"[^\s\S]"), "matches no text"),
        (StructuredOutputSpec(json_schema='{"enum": []}'), "Unsatisfiable"),
    ],
)
def test_the_front_refuses_a_spec_that_does_not_compile(tokenizer, spec, reason):
    error = StructuredOutputValidator(tokenizer, 4096).error(spec)
    assert error is not None and reason in error
    if spec.regex == r"[^\s\S]":  # our own words, not llguidance's
        assert error == "it matches no text at all"


def test_a_bad_spec_sent_to_the_core_fails_that_request_alone(model, tokenizer):
    engine = make_engine(model, tokenizer)
    bad = sampled(StructuredOutputSpec(regex="("), seed=0)
    good = sampled(StructuredOutputSpec(choice=CHOICES), seed=0)
    outputs = run(engine, {0: [("bad", [1, 2], bad), ("good", [1, 2], good)]})
    assert outputs["bad"][-1].finish_reason == "error"
    assert "does not compile" in (outputs["bad"][-1].error or "")
    assert text_of(outputs["good"]) in CHOICES
    assert_pool_whole(engine)


def test_spec_sets_exactly_one_thing():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputSpec()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputSpec(regex="a", grammar="start: a")


def test_constrained_requests_beside_speculating_ones(model, tokenizer):
    """With speculation on, a constrained request never drafts (its matcher cannot take back
    a rejected token), its bitmask row stays its own while greedy neighbours verify drafts,
    and both give the tokens they give with speculation off."""
    me = ("me", tokenizer.encode(PROMPTS[0]), sampled(json_spec(SCHEMAS[0]), seed=7))
    # Repetitive greedy neighbours: their n-gram drafts are accepted often.
    neighbours = [
        (f"g{i}", tokenizer.encode(PROMPTS[i % 3] * 3), SamplingParams(max_tokens=40))
        for i in range(4)
    ]
    arrivals = {0: neighbours[:2] + [me] + neighbours[2:]}
    plain = run(make_engine(model, tokenizer), arrivals)
    engine = make_engine(model, tokenizer, speculative_ngram=True)
    scheduler = engine.core.scheduler
    schedule = scheduler.schedule
    constrained_steps = 0

    def schedule_and_check():
        nonlocal constrained_steps
        plan = schedule()
        for item in plan.scheduled:
            if item.seq.params.structured_output is not None:
                constrained_steps += 1
                assert not item.draft, "a constrained request was given draft tokens"
        return plan

    scheduler.schedule = schedule_and_check  # type: ignore[method-assign]
    speculative = run(engine, arrivals)
    assert constrained_steps > 5
    assert engine.core.stats().num_accepted_draft_tokens > 0
    for rid in plain:
        assert tokens_of(speculative[rid]) == tokens_of(plain[rid]), rid
    jsonschema.validate(json.loads(text_of(speculative["me"])), SCHEMAS[0])
    assert speculative["me"][-1].finish_reason == "stop"
    assert_pool_whole(engine)


def test_a_token_its_grammar_refuses_fails_that_request_alone(model, tokenizer, monkeypatch):
    """The mask makes it impossible; were a refused token sampled anyway (a bug), the
    request ends with an error naming structured output, and its neighbour goes on."""
    monkeypatch.setattr(StructuredOutputManager, "bitmask", lambda self, grammars: None)
    engine = make_engine(model, tokenizer)
    digits = SamplingParams(max_tokens=8, temperature=0.0, structured_output=REGEX_DIGITS)
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = tokenizer.encode(PROMPTS[0])  # text: the unmasked greedy pick is no digit
    outputs = run(engine, {0: [("digits", prompt, digits), ("free", prompt, free)]})
    last = outputs["digits"][-1]
    assert last.finish_reason == "error"
    assert (last.error or "").startswith("structured output: ")
    assert len(tokens_of(outputs["digits"])) == 1  # ended at the first refused token
    assert outputs["free"][-1].finish_reason == "length" and len(tokens_of(outputs["free"])) == 8
    assert_pool_whole(engine)


def test_a_core_without_a_tokenizer_refuses_structured_output_alone(model, tokenizer):
    engine = make_engine(model, tokenizer)
    engine.core.structured = None  # a core built without one (no tokenizer to compile for)
    spec = sampled(StructuredOutputSpec(choice=CHOICES), seed=0)
    outputs = run(engine, {0: [("s", [1, 2], spec), ("free", [1, 2], sampled_free(0))]})
    assert outputs["s"][-1].finish_reason == "error"
    assert outputs["s"][-1].error == (
        "structured output: this engine core has no tokenizer to compile it for"
    )
    assert outputs["free"][-1].finish_reason in ("stop", "length")


def test_a_grammar_completed_by_the_last_allowed_token_ends_with_stop(model, tokenizer):
    """max_tokens reached by the very token that completes the grammar: the output is
    whole, so the request ends with "stop", as with room to spare."""
    spec = StructuredOutputSpec(choice=("the LORD said unto Moses",))
    prompt = tokenizer.encode(PROMPTS[1])
    roomy = run(make_engine(model, tokenizer), {0: [("r", prompt, sampled(spec, 5, 60))]})["r"]
    n = len(tokens_of(roomy))
    assert roomy[-1].finish_reason == "stop" and n > 1
    exact = run(make_engine(model, tokenizer), {0: [("r", prompt, sampled(spec, 5, n))]})["r"]
    assert tokens_of(exact) == tokens_of(roomy) and exact[-1].finish_reason == "stop"
