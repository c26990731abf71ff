"""Incremental detokenization: deltas concatenate to one-shot decoding and never carry a
partial UTF-8 character."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from palm_serve.model import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, load_tokenizer

TEXTS = [
    "Hello, world! Plain ASCII first.",
    "東京都の天気は晴れです。日本語の文章をトークン化する。",
    "Emoji 🎉🚀 and flags 🇯🇵, mixed with ZWJ 👩‍👩‍👧 sequences.",
    "Ελληνικά, кириллица, עברית, العربية — accents: café naïve façade.",
    "Math ∀x∈ℝ: x² ≥ 0 …",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A small byte-level BPE, trained on text that leaves most CJK and emoji split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer.from_file(path)


def _stream(tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("which", ["bpe", "bytes"])
def test_stream_equals_one_shot(text: str, which: str, bpe: HFTokenizer) -> None:
    tokenizer = bpe if which == "bpe" else ByteTokenizer()
    ids = tokenizer.encode(text)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    if not text.isascii():  # multi-byte characters really were split across tokens
        assert any(d == "" for d in deltas[:-1])


def test_stream_after_a_prompt(bpe: HFTokenizer) -> None:
    prompt, completion = bpe.encode("日本語: "), bpe.encode("東京🎉 done")
    deltas = _stream(bpe, completion, prompt)
    assert "".join(deltas) == "東京🎉 done"


def test_dangling_bytes_flush_as_replacement() -> None:
    tokenizer = ByteTokenizer()
    ids = "🎉".encode()[:2]
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == ["", ""]
    assert detok.flush() == "\ufffd"


def test_eos_and_fallback(bpe: HFTokenizer, tmp_path: Path) -> None:
    assert bpe.eos_token_id == 0
    assert bpe.decode([bpe.eos_token_id, *bpe.encode("ok")]) == "ok"
    fallback = load_tokenizer(tmp_path, vocab_size=300)
    assert isinstance(fallback, ByteTokenizer) and fallback.eos_token_id == 256
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        ByteTokenizer(100)


class _PlainTokenizer:
    """The bpe tokenizer seen only through the Tokenizer protocol: the detokenizer's own
    steps, not the library's stream."""

    def __init__(self, inner: HFTokenizer) -> None:
        self.inner = inner
        self.vocab_size, self.eos_token_id, self.bos_token_id = inner.vocab_size, 0, None

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


def _counting_streams(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[int]:
    """Count the library stream's steps (calls[0]); with fail_after, each stream raises at
    its step number fail_after, as the library does where emitted text would change."""
    calls = [0]
    make = HFTokenizer.stream_decoder

    def stream_decoder(self: HFTokenizer, context: list[int]):
        step, taken = make(self, context), [0]

        def counted(token_id: int) -> str | None:
            calls[0] += 1
            taken[0] += 1
            if fail_after is not None and taken[0] == fail_after:
                raise Exception("InvalidPrefix")
            return step(token_id)

        return counted

    monkeypatch.setattr(HFTokenizer, "stream_decoder", stream_decoder)
    return calls


def _random_streams(tokenizer: HFTokenizer, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, output) pairs: encoded text mixed with random ids, whose bytes end and begin
    inside characters."""
    rng = random.Random(5)
    pairs = []
    for _ in range(count):
        text = "".join(rng.choice(TEXTS)[: rng.randint(0, 12)] for _ in range(3))
        ids = [i if rng.random() < 0.7 else rng.randrange(tokenizer.vocab_size)
               for i in tokenizer.encode(text)]  # fmt: skip
        ids += [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 8))]
        cut = rng.randint(0, len(ids))
        pairs.append((ids[:cut], ids[cut:]))
    return pairs


def test_the_library_stream_gives_the_detokenizer_own_deltas(
    bpe: HFTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HF tokenizer's steps run in the tokenizers library; delta for delta they equal the
    detokenizer's own steps, also where the prompt or the output ends inside a character."""
    calls = _counting_streams(monkeypatch)
    plain = _PlainTokenizer(bpe)
    for prompt, output in _random_streams(bpe, 300):
        assert _stream(bpe, output, prompt) == _stream(plain, output, prompt), (prompt, output)
    assert calls[0] > 1000, "the library's stream did not run"


@pytest.mark.parametrize("fail_after", [1, 2, 5])
def test_a_stream_that_fails_hands_over_to_the_detokenizer_own_steps(
    fail_after: int, bpe: HFTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting_streams(monkeypatch, fail_after)
    plain = _PlainTokenizer(bpe)
    for prompt, output in _random_streams(bpe, 100):
        assert _stream(bpe, output, prompt) == _stream(plain, output, prompt), (prompt, output)
    assert calls[0] > 0
