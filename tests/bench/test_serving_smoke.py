"""bench/serving.py against a real palm-serve (uvicorn on 127.0.0.1, tiny random model): one
streamed request, and the report's fields are filled and consistent. Speed is not checked
(benchmarks measure it; tests never time anything)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "server"))

from report import format_report, write_json  # noqa: E402
from serving import LoadConfig, run_load  # noqa: E402
from workloads import BenchRequest, LengthSpec  # noqa: E402

from server_helpers import running_server, write_model_dir  # noqa: E402

OUTPUT_LEN = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(write_model_dir(tmp_path_factory.mktemp("model") / "tiny")) as s:
        yield s


def test_one_request_report_is_filled_and_sane(server, tmp_path: Path) -> None:
    # The test model has the byte-level tokenizer: "hello" is 5 prompt tokens.
    request = BenchRequest(prompt="hello", prompt_len=5, output_len=OUTPUT_LEN)
    cfg = LoadConfig(
        base_url=server.url,
        model="tiny",
        max_concurrency=1,
        extra_body={"ignore_eos": True, "stream_options": {"include_usage": True}},
        progress=False,
        label="smoke",
    )
    report = asyncio.run(run_load([request], cfg))
    results = report.pop("results")
    assert (report["completed"], report["errors"]) == (1, 0), report["error_examples"]
    assert report["output_tokens"] == OUTPUT_LEN  # the server's usage, ignore_eos honoured
    assert report["prompt_tokens"] == 5
    (result,) = results
    assert 0 < result.ttft <= result.latency
    assert len(result.itl) <= OUTPUT_LEN - 1  # gaps between token-bearing chunks
    assert report["request_throughput"] > 0 and report["output_throughput"] > 0
    tpot = (result.latency - result.ttft) / (OUTPUT_LEN - 1)
    assert report["tpot_ms"]["mean"] == pytest.approx(1000 * tpot)
    assert report["ttft_ms"]["p50"] == pytest.approx(1000 * result.ttft)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        s = report[key]
        assert s["p50"] <= s["p90"] <= s["p99"]
    assert "smoke: 1 ok, 0 errors" in format_report(report)
    write_json(report, results, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["completed"] == 1 and saved["requests"][0]["output_len"] == OUTPUT_LEN


def test_a_failing_request_is_counted_as_an_error(server) -> None:
    """A negative temperature is a 400 from palm-serve: reported as an error, not a crash."""
    request = BenchRequest(prompt="hello", prompt_len=5, output_len=4)
    cfg = LoadConfig(
        base_url=server.url, model="tiny", extra_body={"temperature": -1}, progress=False
    )
    report = asyncio.run(run_load([request], cfg))
    assert (report["completed"], report["errors"]) == (0, 1)
    assert report["error_examples"][0].startswith("HTTP 400")


def test_length_specs_parse_and_stay_in_range() -> None:
    import random

    rng = random.Random(0)
    assert LengthSpec.parse("64").sample(rng) == 64
    uniform = LengthSpec.parse("32-512")
    assert all(32 <= uniform.sample(rng) <= 512 for _ in range(200))
    tail = LengthSpec.parse("sharegpt:16-256:64")
    draws = [tail.sample(rng) for _ in range(2000)]
    assert min(draws) >= 16 and max(draws) <= 256
    assert sorted(draws)[1000] < sum(draws) / len(draws)  # long right tail: median < mean
