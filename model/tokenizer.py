"""Tokenizers: HF `tokenizers` from tokenizer.json, or a byte-level fallback, and the
incremental detokenizer that streams text without ever splitting a UTF-8 character."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers.decoders import DecodeStream

from .checkpoint import TOKENIZER_FILE

REPLACEMENT_CHAR = "\ufffd"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
BOS_CANDIDATES = ("<|startoftext|>", "<s>", "<bos>", "<|bos|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A tokenizer.json loaded by the `tokenizers` library."""

    def __init__(self, model: HFTokenizerModel) -> None:
        self._model = model
        self.vocab_size = model.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = _first_token_id(model, EOS_CANDIDATES)
        self.bos_token_id = _first_token_id(model, BOS_CANDIDATES)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        return cls(HFTokenizerModel.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._model.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(ids, skip_special_tokens=True)

    def stream_decoder(self, context: list[int]) -> Callable[[int], str | None]:
        """The library's incremental decoder after the ids `context` (text already out):
        each call takes the next id and returns the text it completes, or None while the
        text would end in U+FFFD. It raises where a decoder's output for more ids does not
        begin with its output for fewer (text already emitted would change)."""
        stream = DecodeStream(ids=context, skip_special_tokens=True)
        model = self._model
        return lambda token_id: stream.step(model, token_id)

    def to_json(self) -> str:
        """The tokenizer.json text (what other libraries load the same tokenizer from)."""
        return self._model.to_str()


def _first_token_id(model: HFTokenizerModel, candidates: tuple[str, ...]) -> int | None:
    for token in candidates:
        token_id = model.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255); id 256, if the vocabulary has it, is EOS.

    For a model directory without tokenizer.json. Ids past 255 decode to nothing."""

    def __init__(self, vocab_size: int = 257) -> None:
        if vocab_size < 256:
            raise ValueError(f"a byte-level tokenizer needs vocab_size >= 256, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id: int | None = 256 if vocab_size > 256 else None
        self.bos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    path = Path(model_dir) / TOKENIZER_FILE
    if path.is_file():
        return HFTokenizer.from_file(path)
    return ByteTokenizer(vocab_size)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (from the last emitted character boundary) and holds back
    text while it ends in U+FFFD, i.e. while a multi-byte character is still incomplete;
    the concatenated deltas plus flush() equal one-shot decoding."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])
        # Decoding restarts at prefix_offset; text up to read_offset has been emitted.
        # Starting a few tokens back keeps context-dependent decoders (leading spaces) right.
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - 5)
        # An HF tokenizer's steps run in the library (the same window, one decode a token in
        # Rust instead of two and the Python around them); None: the steps below, which also
        # serve a prompt that ends inside a character (the library would join its dangling
        # bytes to the output's, and the deltas would no longer add up to the output's text).
        self._stream: Callable[[int], str | None] | None = None
        if isinstance(tokenizer, HFTokenizer):
            context = self.ids[self.prefix_offset :]
            if not tokenizer.decode(context).endswith(REPLACEMENT_CHAR):
                self._stream = tokenizer.stream_decoder(context)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that is now safe to emit (maybe '')."""
        self.ids.append(token_id)
        if self._stream is None:
            return self._advance(final=False)
        try:
            text = self._stream(token_id)
        except Exception:  # emitted text would change: the steps below cut by length
            self._stream = None
            return self._advance(final=False)
        if text is None:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is still held back (a dangling partial character becomes U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(emitted) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(emitted) :]
