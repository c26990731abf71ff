"""Engine TokenLogprobs -> the three wire formats: ours (/v1/generate), OpenAI's legacy
completions format (tokens, token_logprobs, top_logprobs, text_offset) and chat's."""

from __future__ import annotations

import math

from ..engine.outputs import TokenLogprob
from ..model.tokenizer import Tokenizer
from .responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    TokenLogprobOut,
    TopLogprob,
)

# JSON has no -inf; like vLLM, an impossible token's logprob is shown as -9999.
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def generate_logprob(tokenizer: Tokenizer, lp: TokenLogprob) -> TokenLogprobOut:
    return TokenLogprobOut(
        token_id=lp.token_id,
        token=token_text(tokenizer, lp.token_id),
        logprob=finite(lp.logprob),
        top_logprobs=[
            TopLogprob(token_id=t, token=token_text(tokenizer, t), logprob=finite(v))
            for t, v in lp.top
        ],
    )


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: list[int],
    entries: list[TokenLogprob | None],
    offset: int = 0,
    with_top: bool = True,
) -> CompletionLogprobs:
    """One entry per token; a None entry (the first prompt token) has null logprobs.
    text_offset counts characters from `offset` (the start of the returned text)."""
    out = CompletionLogprobs()
    for token_id, lp in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        out.token_logprobs.append(None if lp is None else finite(lp.logprob))
        top = None
        if lp is not None and with_top:
            # The chosen token is always listed, as OpenAI does, then the alternatives.
            top = {text: finite(lp.logprob)}
            for t, v in lp.top:
                top.setdefault(token_text(tokenizer, t), finite(v))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    content = []
    for lp in entries:
        text = token_text(tokenizer, lp.token_id)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=finite(lp.logprob),
                bytes=list(text.encode()),
                top_logprobs=[_chat_top(tokenizer, t, v) for t, v in lp.top],
            )
        )
    return ChatLogprobs(content=content)


def _chat_top(tokenizer: Tokenizer, token_id: int, logprob: float) -> ChatTopLogprob:
    text = token_text(tokenizer, token_id)
    return ChatTopLogprob(token=text, logprob=finite(logprob), bytes=list(text.encode()))
