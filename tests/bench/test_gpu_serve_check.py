"""bench/gpu_serve_check.py's requests, which only a GPU session sends: each is a valid
/v1/generate body (so a protocol change cannot leave the check to fail on its first GPU),
and the kinds that gate its exit code are exactly the greedy ones."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_serve_check as check  # noqa: E402

from palm_serve.server.protocol import GenerateRequest  # noqa: E402


def test_every_request_kind_is_a_valid_generate_body() -> None:
    texts = check.prompts(2 * len(check.REQUEST_KINDS))
    for i, text in enumerate(texts):
        body = check.request_body(i, text)
        request = GenerateRequest.model_validate(body)
        assert request.max_tokens == 24 and request.ignore_eos
        assert (request.temperature == 0) == check.is_greedy(i), body


def test_sampled_kinds_are_seeded_so_the_cpu_can_referee_them() -> None:
    for i, kind in enumerate(check.REQUEST_KINDS):
        if not check.is_greedy(i):
            assert kind.get("seed") is not None, kind
