"""Structured output (constrained decoding) with llguidance: a request's
StructuredOutputSpec becomes an llguidance grammar, compiled into an LLMatcher once per
spec (cached) and copied for each sequence; the matcher advances on every accepted output
token, and before each step the matchers of the sequences due a token fill one int32
bitmask for the whole batch (bit j of word w allows token 32 w + j), which the sampler
applies to the logits before anything else.

The front (StructuredOutputValidator) compiles a spec to refuse a bad one with a 400
before the request is sent; the core (StructuredOutputManager) compiles it again in its
own process. Both caches are keyed by the spec itself.

Why llguidance rather than xgrammar: it has no Python dependencies (xgrammar pulls torch
builds of its own and CUDA-oriented kernels), builds a matcher for a JSON schema in about
a millisecond (no per-grammar precompilation over the vocabulary), accepts Lark grammars,
regexes and JSON schemas through one API, and is what vLLM and SGLang offer as an
alternative backend."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import llguidance
import torch

from ..model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from .sampling_params import StructuredOutputSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of its stubs only

# JSON is generated compactly with fixed separators: a flexible-whitespace grammar lets a
# sampled model pad the output with whitespace until max_tokens runs out.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Compiled specs kept per process (each a matcher of a few hundred KB at most).
CACHE_SIZE = 256


def grammar_of(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar (its JSON text) for a spec; ValueError when the JSON schema
    is not JSON (every other error shows when the grammar is compiled)."""
    matcher = llguidance.LLMatcher
    if spec.json_schema is not None:
        try:
            return matcher.grammar_from_json_schema(spec.json_schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"the JSON schema cannot be read: {exc}") from None
    if spec.regex is not None:
        return matcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # Lark string literals take JSON's escapes.
        return matcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, spec.choice)))
    assert spec.grammar is not None  # StructuredOutputSpec sets exactly one
    return matcher.grammar_from_lark(spec.grammar)


def llg_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: the tokenizers JSON for a BPE, the bytes of each
    token otherwise. Needs an EOS token: it is how an accepting grammar ends."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model's tokenizer has no EOS token, which structured output needs")
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos)
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_TokenBytes(tokenizer, vocab_size)),
        n_vocab=vocab_size,
        eos_token=eos,
    )


class _TokenBytes:
    """The `gtokenizer` llguidance.TokenizerWrapper reads: every token's bytes."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = [
            t for t in (self.eos_token_id, self.bos_token_id) if t is not None
        ]
        if isinstance(tokenizer, ByteTokenizer):
            self.tokens = [bytes([i]) if i < 256 else b"<special>" for i in range(vocab_size)]
        else:
            self.tokens = [tokenizer.decode([i]).encode() for i in range(vocab_size)]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


class _CompiledSpecs:
    """spec -> a pristine matcher (or the reason it does not compile), least recently used
    dropped first."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[StructuredOutputSpec, llguidance.LLMatcher | str] = OrderedDict()

    def get(self, spec: StructuredOutputSpec) -> llguidance.LLMatcher | str:
        found = self._cache.get(spec)
        if found is None:
            found = self._compile(spec)
            self._cache[spec] = found
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec)
        return found

    def _compile(self, spec: StructuredOutputSpec) -> llguidance.LLMatcher | str:
        try:
            grammar = grammar_of(spec)
        except ValueError as exc:
            return str(exc)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return matcher.get_error()
        # A spec no text satisfies compiles, and its first mask puts the matcher in error.
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            return "it matches no text at all"
        return matcher


class StructuredOutputValidator:
    """The front's check: the reason a spec cannot be compiled, or None. Call it from a
    worker thread (a large schema takes milliseconds; llguidance releases the GIL)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._source = (tokenizer, vocab_size)
        self._specs: _CompiledSpecs | None = None
        self._lock = threading.Lock()  # worker threads share the cache

    def error(self, spec: StructuredOutputSpec) -> str | None:
        with self._lock:
            if self._specs is None:
                try:
                    self._specs = _CompiledSpecs(llg_tokenizer(*self._source))
                except ValueError as exc:
                    return str(exc)
            found = self._specs.get(spec)
        return found if isinstance(found, str) else None


class GrammarState:
    """One sequence's matcher, kept in step with its output tokens: it has consumed exactly
    the first num_consumed of them. A preempted sequence keeps it (its output tokens stay);
    recomputing their K/V appends no token, so nothing is consumed twice."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0
        # The core ended the request because the grammar was complete (not by EOS).
        self.ended_request = False

    def advance(self, output_token_ids: list[int]) -> None:
        """Consume the output tokens not consumed yet."""
        new = output_token_ids[self.num_consumed :]
        if new:
            self.matcher.consume_tokens(new)
            self.num_consumed = len(output_token_ids)

    @property
    def is_complete(self) -> bool:
        """The grammar is satisfied and admits no further token (EOS included)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher refused a token (a bug: the mask allows only tokens it accepts)."""
        return self.matcher.get_error() or None


class StructuredOutputManager:
    """The core's side: a GrammarState per constrained sequence, and the step's bitmask."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, num_threads: int = 1) -> None:
        self._source = (tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self._specs: _CompiledSpecs | None = None  # built on first use (~0.2 s for 4k tokens)
        # With one thread the rows are filled in the calling thread: llguidance's executor
        # would hand them to a worker thread of its own, which then competes with the
        # model's thread for the core (docs/BENCHMARKS.md).
        self._executor = llguidance.LLExecutor(num_threads) if num_threads > 1 else None

    def start(self, spec: StructuredOutputSpec) -> GrammarState:
        """A fresh matcher for a sequence; ValueError saying why the spec does not compile."""
        if self._specs is None:
            self._specs = _CompiledSpecs(llg_tokenizer(*self._source))
        found = self._specs.get(spec)
        if isinstance(found, str):
            raise ValueError(f"structured output does not compile: {found}")
        return GrammarState(found.deep_copy())

    def bitmask(self, grammars: list[GrammarState | None]) -> torch.Tensor | None:
        """int32 [len(grammars), ceil(V / 32)], one row per sequence due a token (all bits
        set where it is unconstrained); None when no sequence of the step is constrained."""
        rows = [(g.matcher, i) for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        width = (self.vocab_size + 31) // 32
        mask = torch.full((len(grammars), width), -1, dtype=torch.int32)
        # llguidance.torch's fill_next_token_bitmask(_par) do the same; importing that module
        # sets up a torch.compile'd function we do not use.
        if self._executor is not None:
            self._executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), width * 4, len(grammars))
        else:
            for matcher, i in rows:
                matcher.unsafe_compute_mask_ptr(mask[i].data_ptr(), width * 4)
        return mask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V] with the tokens a bitmask [N, ceil(V / 32)] forbids set to -inf."""
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = bitmask.to(logits.device).unsqueeze(-1)  # (N, W, 1)
    allowed = ((words >> bits) & 1).flatten(1)[:, : logits.shape[1]]  # (N, V)
    return logits.masked_fill(allowed == 0, float("-inf"))
