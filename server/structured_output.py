"""The structured-output fields of the HTTP API, named as vLLM names them: OpenAI's
`response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}) and `structured_outputs` ({"json" | "regex" | "choice" |
"grammar" | "json_object"}). Each becomes the engine's StructuredOutputSpec, compiled once
by the engine (off the event loop, cached by spec) before the request is admitted, so a
spec that cannot compile is a 400 naming its field and the reason."""

from __future__ import annotations

import json

from ..engine.errors import InvalidRequestError
from ..engine.sampling_params import StructuredOutputSpec
from .errors import bad_request, from_engine_error
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from .state import ServerState

ANY_OBJECT = json.dumps({"type": "object"})
KEYS = ("json", "regex", "choice", "grammar", "json_object")


async def structured_output(
    state: ServerState, body: GenerateRequest | CompletionRequest | ChatCompletionRequest
) -> StructuredOutputSpec | None:
    """The request's spec, checked to compile (400 otherwise), or None if it has none."""
    found = _spec(body)
    if found is None:
        return None
    spec, param = found
    try:
        await state.engine.check_structured_output(spec, param)
    except InvalidRequestError as exc:
        raise from_engine_error(exc) from None
    return spec


def _spec(
    body: GenerateRequest | CompletionRequest | ChatCompletionRequest,
) -> tuple[StructuredOutputSpec, str] | None:
    """(spec, the field it came from), or None."""
    fmt = getattr(body, "response_format", None)
    wanted = body.structured_outputs
    if fmt is not None and fmt.type != "text":
        if wanted is not None:
            raise bad_request(
                "structured_outputs: give it or a response_format other than text, not both",
                "structured_outputs",
            )
        if fmt.type == "json_object":
            return StructuredOutputSpec(json_schema=ANY_OBJECT), "response_format"
        if fmt.json_schema is None:
            raise bad_request(
                "response_format.json_schema: required when type is 'json_schema'",
                "response_format.json_schema",
            )
        schema = json.dumps(fmt.json_schema.schema_)
        return StructuredOutputSpec(json_schema=schema), "response_format.json_schema.schema"
    if wanted is None:
        return None
    values = (wanted.json_, wanted.regex, wanted.choice, wanted.grammar, wanted.json_object)
    given = [key for key, value in zip(KEYS, values, strict=True) if value not in (None, False)]
    if len(given) != 1:
        raise bad_request(
            f"structured_outputs: set exactly one of {', '.join(KEYS)} (got "
            f"{', '.join(given) or 'none'})",
            "structured_outputs",
        )
    param = f"structured_outputs.{given[0]}"
    if wanted.json_object:
        return StructuredOutputSpec(json_schema=ANY_OBJECT), param
    if wanted.json_ is not None:
        return StructuredOutputSpec(json_schema=_schema_text(wanted.json_, param)), param
    if wanted.choice is not None:
        return StructuredOutputSpec(choice=tuple(wanted.choice)), param
    return StructuredOutputSpec(regex=wanted.regex, grammar=wanted.grammar), param


def _schema_text(schema: dict | str, param: str) -> str:
    """The schema as JSON text (key order kept: it is the order of the generated keys)."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        raise bad_request(f"{param}: not valid JSON ({exc})", param) from None
    if not isinstance(parsed, dict):
        raise bad_request(f"{param}: a JSON schema must be an object", param)
    return json.dumps(parsed)
