"""Response bodies (pydantic v2): they document /openapi.json and shape every JSON we send."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# --- /v1/generate ---------------------------------------------------------------------


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprobOut(BaseModel):
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # The stop string or stop token id that ended generation, if one did.
    stop_reason: str | int | None = None
    usage: Usage
    logprobs: list[TokenLogprobOut] | None = None


class GenerateStreamEvent(BaseModel):
    """One SSE event: a token (token_id, text delta, logprob) or, last, the finish."""

    id: str
    token_id: int | None = None
    text: str = ""
    logprob: TokenLogprobOut | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None


# --- OpenAI /v1/completions -----------------------------------------------------------


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format; with echo the prompt's tokens come first (the first null)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- OpenAI /v1/chat/completions ------------------------------------------------------


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# --- /v1/models, /health, /ready --------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "palm-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str
