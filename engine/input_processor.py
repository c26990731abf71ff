"""InputProcessor: the front's way in. A prompt is tokenized once (tokenize) and a request
validated once (make_request), before anything is queued; whatever makes a request
unservable is an InvalidRequestError naming the parameter and why (the server: 400)."""

from __future__ import annotations

import time
import uuid

from ..model.tokenizer import Tokenizer
from .errors import InvalidRequestError
from .messages import EngineCoreRequest
from .sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def tokenize(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """A text prompt's token ids (the one encode of that prompt), or a token-id prompt
        checked against the vocabulary. Whatever makes the text untokenizable is the text's
        fault: an InvalidRequestError naming `param`, the field it came from."""
        if isinstance(prompt, str):
            ids = self._encode(prompt, param)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise InvalidRequestError(f"{param} must be a string or a list of token ids", param)
        if not ids:
            raise InvalidRequestError(f"{param} is empty (it encodes to no tokens)", param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{param}: token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                param,
            )
        return ids

    def _encode(self, text: str, param: str) -> list[int]:
        surrogate = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if surrogate is not None:
            raise InvalidRequestError(
                f"{param}: lone surrogate U+{ord(text[surrogate]):04X} at character "
                f"{surrogate} is not valid Unicode",
                param,
            )
        try:
            return self.tokenizer.encode(text)
        except Exception as exc:  # noqa: BLE001 - a tokenizer that refuses the text
            raise InvalidRequestError(
                f"{param}: the tokenizer refused the text ({type(exc).__name__}: {exc})", param
            ) from None

    def make_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> EngineCoreRequest:
        """The request the core will run, once it fits the context and the vocabulary."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        n, m, limit = len(prompt_ids), params.max_tokens, self.max_model_len
        if n == 0:
            raise InvalidRequestError("prompt is empty (it encodes to no tokens)", "prompt")
        if n >= limit:
            raise InvalidRequestError(
                f"prompt has {n} tokens, more than the model's context length of {limit} "
                f"tokens allows (at most {limit - 1} prompt tokens)",
                "prompt",
            )
        if n + m > limit:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} exceeds the model's context "
                f"length of {limit} tokens; lower max_tokens to at most {limit - n}",
                "max_tokens",
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids {bad} are outside the vocabulary [0, {self.vocab_size})",
                "stop_token_ids",
            )
        return EngineCoreRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            params=params,
            arrival_time=time.monotonic(),
        )
