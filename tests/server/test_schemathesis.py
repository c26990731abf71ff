"""schemathesis (v4) against the server's own /openapi.json: valid and invalid bodies,
a bounded number of examples per operation (max_tokens is bounded to 8 in the served
schema, so it stays fast). No 5xx; status codes, content types and JSON bodies conform
to the schema; invalid bodies are rejected."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from server_helpers import model_dir, running_server  # noqa: F401

EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api(model_dir):
    with running_server(model_dir, max_tokens_limit=8) as server:
        yield server


def run_operation(operation, url: str, mode: GenerationMode) -> None:
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        case.call_and_validate(base_url=url, checks=checks, timeout=60)

    check()


def test_api_conforms_to_its_openapi_schema(api):
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/generate",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
        "GET /health",
        "GET /ready",
        "GET /metrics",
    }
    for op in operations:
        run_operation(op, api.url, GenerationMode.POSITIVE)
        if op.method.upper() == "POST":
            run_operation(op, api.url, GenerationMode.NEGATIVE)
    # Fuzzing left the server healthy and its pool empty.
    assert api.engine.healthy and api.engine.stats().kv_cache_usage == 0
