"""NgramProposer: draft tokens without a draft model ("prompt lookup" decoding, as vLLM's
n-gram proposer and llama.cpp's lookup decoding). The sequence's last n tokens are looked
up earlier in its own prompt + output, and the tokens that followed the match are
proposed. The longest n (ngram_max down to ngram_min) with a match wins; among its matches
the latest one followed by max_tokens tokens (the most recent context; in a loop shorter
than max_tokens that is a full draft, not one period), else the earliest (the longest
continuation)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to max_tokens draft tokens to follow token_ids (none without a match)."""
        if max_tokens < 1 or len(token_ids) <= self.ngram_min:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            start = self._best_match(tokens, n, max_tokens)
            if start is not None:
                follow = start + n
                return tokens[follow : follow + max_tokens].tolist()
        return []

    @staticmethod
    def _best_match(tokens: np.ndarray, n: int, max_tokens: int) -> int | None:
        """Start of an earlier occurrence of the last n tokens (the suffix itself excluded),
        or None."""
        suffix = tokens[-n:]
        windows = sliding_window_view(tokens[:-1], n)  # (L - n, n): each followed by a token
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if not hits.size:
            return None
        full = hits[hits + n + max_tokens <= len(tokens)]
        return int(full[-1]) if full.size else int(hits[0])
