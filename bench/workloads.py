"""Workloads: seeded prompt / output lengths and the prompts' text.

Length distributions: fixed, uniform ranges, or a ShareGPT-like long-tailed mix (log-normal
lengths, clipped; generated here, no data set needed). Prompts are text windows of a corpus
(the Python standard library's sources), re-tokenized until their token length is exact,
so every server sees the same number of prompt tokens for a text prompt."""

from __future__ import annotations

import math
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Distribution = Literal["fixed", "uniform", "sharegpt"]


@dataclass(frozen=True)
class LengthSpec:
    """Token lengths of prompts or outputs. fixed: `low`; uniform: [low, high];
    sharegpt: log-normal around `median`, clipped to [low, high] (a long right tail)."""

    kind: Distribution = "fixed"
    low: int = 64
    high: int = 64
    median: int = 64

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        # sigma 0.9: p90/p50 ~ 3.2, close to ShareGPT's prompt and reply lengths.
        value = int(round(math.exp(rng.gauss(math.log(self.median), 0.9))))
        return min(max(value, self.low), self.high)

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        """'64' (fixed), '32-512' (uniform), 'sharegpt:32-512:128' (long tail, median 128)."""
        if text.startswith("sharegpt:"):
            _, bounds, median = text.split(":")
            low, high = (int(x) for x in bounds.split("-"))
            return cls("sharegpt", low, high, int(median))
        if "-" in text:
            low, high = (int(x) for x in text.split("-"))
            return cls("uniform", low, high, (low + high) // 2)
        return cls("fixed", int(text), int(text), int(text))


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens, by the benchmark's tokenizer
    output_len: int  # tokens asked for (max_tokens, and min_tokens where supported)


def corpus_text(max_chars: int = 400_000) -> str:
    """Deterministic offline text: the stdlib's .py files in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)


class PromptMaker:
    """Text prompts of an exact token length, from random windows of the corpus."""

    def __init__(self, tokenizer_file: str | Path, seed: int) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_file))
        self.ids = self.tok.encode(corpus_text(), add_special_tokens=False).ids
        self.rng = random.Random(seed)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def make(self, n: int) -> tuple[str, int]:
        """A text whose encoding is n tokens (or the closest found in a few tries)."""
        start = self.rng.randrange(0, len(self.ids) - n - 64)
        ids = self.ids[start : start + n]
        text, got = "", 0
        for extra in range(8):
            text = self.tok.decode(ids, skip_special_tokens=True)
            got = len(self.encode(text))
            if got == n:
                break
            # Re-tokenization merged or split at the window's edges: nudge the window.
            ids = self.ids[start : start + n + (n - got) + extra % 2]
        return text, got


def make_requests(
    num: int,
    prompt_spec: LengthSpec,
    output_spec: LengthSpec,
    tokenizer_file: str | Path,
    seed: int,
) -> list[BenchRequest]:
    rng = random.Random(seed)
    maker = PromptMaker(tokenizer_file, seed + 1)
    requests = []
    for _ in range(num):
        text, got = maker.make(prompt_spec.sample(rng))
        requests.append(BenchRequest(text, got, output_spec.sample(rng)))
    return requests
