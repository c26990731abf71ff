"""Incremental detokenization: deltas concatenate to one-shot decoding and never carry a
partial UTF-8 character."""

from __future__ import annotations

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
