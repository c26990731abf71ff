"""Request bodies of the HTTP API (pydantic v2). Schema errors become 400s naming the field
(errors.py). Our own /v1/generate forbids unknown fields (a typo should not be silently
ignored); the OpenAI routes ignore unknown fields so that real clients keep working, and
refuse the known ones we cannot honour (routes_common.reject_unsupported)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# Limits that bound what the engine can be asked; max_tokens is bounded per server by
# Settings.max_tokens_limit (checked in the routes, and written into /openapi.json).
MAX_STOP = 16
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 16  # OpenAI's default; capped by the server's max_tokens_limit


# The wire types are strict: exactly what the JSON schema says, no silent conversion of
# true, "3" or 3.0 into numbers (pydantic's lax mode would), so what /openapi.json
# documents is what is accepted.
Int = StrictInt
Float = StrictFloat
Bool = StrictBool
TokenId = Annotated[StrictInt, Field(ge=0)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Stop = NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: the output must match exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | StrictStr | None = Field(
        None, alias="json", description="a JSON schema (an object, or its JSON text)"
    )
    regex: NonEmptyText | None = None
    choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = None
    grammar: NonEmptyText | None = Field(None, description="a Lark grammar (llguidance's)")
    json_object: Bool | None = Field(None, description="true: any JSON object")


class SamplingFields(BaseModel):
    """Fields shared by every generation route; names and meaning as in vLLM/OpenAI."""

    temperature: Float = Field(1.0, ge=0, le=100, description="0 = greedy")
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: Int = Field(0, ge=-1, description="0 or -1 disables it")
    min_p: Float = Field(0.0, ge=0, le=1)
    repetition_penalty: Float = Field(1.0, gt=0, le=100)
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    stop: Stop = Field(None, description="a string or a list of strings that end generation")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: Bool = False
    seed: Int | None = Field(None, ge=0, le=MAX_SEED)
    structured_outputs: StructuredOutputs | None = None

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: NonEmptyText | TokenIds = Field(..., description="text, or token ids")
    max_tokens: Int | None = Field(None, ge=1, description="default: 16 (or the server limit)")
    stream: Bool = False
    logprobs: Int | None = Field(
        None, ge=0, le=20, description="0: the chosen token's logprob; N: and the top N"
    )


class StreamOptions(BaseModel):
    include_usage: Bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(..., alias="schema")
    # Accepted for compatibility: the output always follows the schema.
    strict: Bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    )
    # 0 is allowed with echo: score the prompt without generating (perplexity over HTTP).
    max_tokens: Int | None = Field(None, ge=0, description="default: 16 (or the server limit)")
    n: Int = Field(1, ge=1, le=16)
    best_of: Int | None = Field(None, ge=1, le=16)
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=20)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    logit_bias: dict[str, Float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    n: Int = Field(1, ge=1, le=16)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    user: str | None = None
