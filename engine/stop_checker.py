"""StopChecker: a request's text, built by incremental detokenization in the front, with
stop strings matched across token boundaries. A stop string is never emitted: text that
could be the start of one is held back until the next token decides."""

from __future__ import annotations

from ..model.tokenizer import IncrementalDetokenizer


class StopChecker:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop: tuple[str, ...] = ()) -> None:
        self.detokenizer = detokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        # The generated text (cut at the first stop string once one appears) from the last
        # max_stop_len - 1 characters handed to the caller on: a stop string ending in new
        # text can begin no earlier. What lies before is dropped, so that a token costs the
        # same however long the output grows.
        self.text = ""
        # Characters of text already handed to the caller.
        self.emitted = 0

    def add_token(self, token_id: int) -> str | None:
        """Detokenize one token; return the stop string it completed, if any."""
        return self._append(self.detokenizer.add(token_id))

    def flush(self) -> str | None:
        """At the end: release what the detokenizer held back (an incomplete character)."""
        return self._append(self.detokenizer.flush())

    def take_text(self, final: bool) -> str:
        """The text that is now safe to emit; with final=True, everything left."""
        if not self.stop:  # nothing is held back, nothing kept: text is all unemitted
            delta, self.text = self.text, ""
            return delta
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        drop = min(end, len(self.text) - max(self.max_stop_len - 1, 0))
        if drop > 0:
            self.text = self.text[drop:]
            end -= drop
        self.emitted = end
        return delta

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        if not self.stop:
            self.text += delta
            return None
        # A stop string ending in the new text starts at most max_stop_len - 1 chars before it.
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        # The stop string that ends first wins (what token-by-token text would have hit
        # first, whatever the tokenization); on a tie the longer one, which starts earlier.
        hits = [
            (i + len(s), i, s) for s in self.stop if (i := self.text.find(s, search_from)) != -1
        ]
        if not hits:
            return None
        _, index, stop = min(hits)
        self.text = self.text[:index]
        return stop

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        for n in range(min(self.max_stop_len - 1, len(self.text)), 0, -1):
            suffix = self.text[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0
