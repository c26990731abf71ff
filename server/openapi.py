"""/openapi.json as this server really behaves: max_tokens bounded by its limit, token ids
by its model's vocabulary, `model` naming the one model served, 400 (not FastAPI's 422)
for schema errors, and each SSE event documented (OpenAPI 3.1: the text/event-stream
schema describes one event; its `data` is JSON of the route's chunk model, or [DONE])."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .responses import ChatCompletionChunk, CompletionResponse, ErrorResponse, GenerateStreamEvent
from .settings import Settings

STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "/v1/generate": GenerateStreamEvent,
    "/v1/completions": CompletionResponse,
    "/v1/chat/completions": ChatCompletionChunk,
}
REF = "#/components/schemas/{model}"


def served_schema(app: FastAPI, settings: Settings, vocab_size: int) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for component in components.values():
            _bound_fields(component, settings, vocab_size)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
            if path in STREAM_EVENTS:
                _document_stream(operations["post"], STREAM_EVENTS[path], components)
        app.openapi_schema = schema
    return app.openapi_schema


def _bound_fields(component: dict[str, Any], settings: Settings, vocab_size: int) -> None:
    for name, prop in component.get("properties", {}).items():
        if name in ("max_tokens", "max_completion_tokens"):
            _bound(prop, settings.max_tokens_limit)
        if name in ("prompt", "stop_token_ids"):
            _bound(prop, vocab_size - 1)
        if name == "model":  # one model is served: say which
            _only(prop, settings.model_name())


def _document_stream(
    operation: dict[str, Any], model: type[BaseModel], components: dict[str, Any]
) -> None:
    for m in (model, ErrorResponse):
        schema = m.model_json_schema(ref_template=REF)
        components.update(schema.pop("$defs", {}))
        components.setdefault(m.__name__, schema)
    json_data = {
        "type": "string",
        "pattern": "^\\{",
        "contentMediaType": "application/json",
        "contentSchema": {
            "anyOf": [{"$ref": REF.format(model=m.__name__)} for m in (model, ErrorResponse)]
        },
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }
    operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": event}


def _only(prop: dict[str, Any], value: str) -> None:
    for variant in prop.get("anyOf", [prop]):
        if variant.get("type") == "string":
            variant["enum"] = [value]


def _bound(prop: dict[str, Any], limit: int) -> None:
    """Set the maximum of every integer in this property (through unions and arrays)."""
    if prop.get("type") == "integer":
        prop["maximum"] = limit
    for variant in prop.get("anyOf", []):
        _bound(variant, limit)
    if isinstance(prop.get("items"), dict):
        _bound(prop["items"], limit)
