"""Request validation: everything that makes a request unservable is caught before it is
queued, with a message naming the field and why (the server answers 400 with it)."""

from __future__ import annotations

from ..model.tokenizer import Tokenizer
from .errors import InvalidRequestError
from .sampling_params import SamplingParams


def validate_request(
    prompt: str | list[int],
    params: SamplingParams,
    tokenizer: Tokenizer,
    vocab_size: int,
    max_model_len: int,
) -> list[int]:
    """The prompt's token ids, or InvalidRequestError."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
    ids = _prompt_ids(prompt, tokenizer, vocab_size)
    n, m = len(ids), params.max_tokens
    if n >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {n} tokens, more than the model's context length of {max_model_len} "
            f"tokens allows (at most {max_model_len - 1} prompt tokens)",
            "prompt",
        )
    if n + m > max_model_len:
        raise InvalidRequestError(
            f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} exceeds the model's context "
            f"length of {max_model_len} tokens; lower max_tokens to at most {max_model_len - n}",
            "max_tokens",
        )
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})", "stop_token_ids"
        )
    return ids


def _prompt_ids(prompt: str | list[int], tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        ids = list(prompt)
    else:
        raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
    if not ids:
        raise InvalidRequestError("prompt is empty (it encodes to no tokens)", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token id(s) {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt"
        )
    return ids
