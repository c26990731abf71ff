"""/metrics after a known load: every palm_ series is present and its count agrees with
what was sent (parsed by prometheus_client's own parser); then a real Prometheus scrapes
the server and its HTTP API returns our series."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest

from server_helpers import free_port, metric, model_dir, parse_metrics, server  # noqa: F401

PROMPTS = ["first prompt", "second", "a third, longer prompt", "4", "five five"]
MAX_TOKENS = [3, 7, 1, 12, 5]
SHARED = "a shared prefix of forty-eight characters, twice"  # 3 blocks of 16
SERIES = [
    "palm_time_to_first_token_seconds",
    "palm_inter_token_latency_seconds",
    "palm_e2e_request_latency_seconds",
    "palm_request_queue_time_seconds",
    "palm_num_requests_running",
    "palm_num_requests_waiting",
    "palm_kv_cache_usage_ratio",
    "palm_prompt_tokens_total",
    "palm_generation_tokens_total",
    "palm_requests_finished_total",
    "palm_num_preemptions_total",
    "palm_prefix_cache_hit_tokens_total",
    "palm_engine_steps_total",
    "palm_engine_step_tokens_total",
    "palm_http_requests_total",
    "palm_http_request_duration_seconds",
]


@pytest.fixture(scope="module")
def loaded(server):
    """Send the known load once: 5 JSON + 5 streamed requests, 2 sharing a prefix, 1 bad."""
    url = f"{server.url}/v1/generate"
    with httpx.Client(timeout=60) as client:
        for prompt, n in zip(PROMPTS, MAX_TOKENS, strict=True):
            body = dict(prompt=prompt, max_tokens=n, ignore_eos=True, temperature=0)
            assert client.post(url, json=body).status_code == 200
            with client.stream("POST", url, json={**body, "stream": True}) as r:
                assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
        for _ in range(2):
            body = dict(prompt=SHARED, max_tokens=2, ignore_eos=True)
            assert client.post(url, json=body).status_code == 200
        assert client.post(url, json={"prompt": ""}).status_code == 400
    return server


def test_series_present_and_counts_agree(loaded):
    text = httpx.get(f"{loaded.url}/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    for series in SERIES:
        assert any(n == series or n.startswith(series + "_") for n in names), series
    m = parse_metrics(text)
    n_requests = 2 * len(PROMPTS) + 2
    generated = 2 * sum(MAX_TOKENS) + 2 * 2
    prompt_tokens = 2 * sum(len(p) for p in PROMPTS) + 2 * len(SHARED)
    assert metric(m, "palm_requests_finished_total", finish_reason="length") == n_requests
    assert metric(m, "palm_requests_finished_total", finish_reason="abort") == 0
    assert metric(m, "palm_generation_tokens_total") == generated
    assert metric(m, "palm_prompt_tokens_total") == prompt_tokens
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert metric(m, f"palm_{hist}_seconds_count") == n_requests, hist
    # One gap per token after the first, also where an output brought several tokens.
    assert metric(m, "palm_inter_token_latency_seconds_count") == generated - n_requests
    ok = dict(method="POST", route="/v1/generate", status="200")
    assert metric(m, "palm_http_requests_total", **ok) == n_requests
    assert metric(m, "palm_http_request_duration_seconds_count", **ok) == n_requests
    bad = dict(method="POST", route="/v1/generate", status="400")
    assert metric(m, "palm_http_requests_total", **bad) == 1
    # The second SHARED request reuses the first one's full blocks (prefix caching).
    hits = metric(m, "palm_prefix_cache_hit_tokens_total")
    assert hits >= 32
    # One request at a time: each step makes one token of one request, and computes its
    # prompt (less the cached part) or one decode.
    assert metric(m, "palm_engine_steps_total") == generated
    decodes = generated - n_requests
    assert metric(m, "palm_engine_step_tokens_total") == prompt_tokens - hits + decodes
    assert metric(m, "palm_num_preemptions_total") == 0
    assert metric(m, "palm_num_requests_running") == metric(m, "palm_num_requests_waiting") == 0
    assert metric(m, "palm_kv_cache_usage_ratio") == 0


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus binary on this machine (apt-get install prometheus)",
)
def test_a_real_prometheus_scrapes_our_series(loaded, tmp_path):
    port = free_port()
    target = loaded.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [{"job_name": "palm", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        want = 2 * sum(MAX_TOKENS) + 4
        value = _query_until(port, "palm_generation_tokens_total", want)
        assert value == want
        up = _query_until(port, 'up{job="palm"}', 1)
        assert up == 1
    finally:
        proc.terminate()
        proc.wait(30)


def _query_until(port: int, query: str, want: float, seconds: float = 45) -> float | None:
    """Ask Prometheus' HTTP API (bounded polling) until the series has the wanted value."""
    deadline, value = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query})
            result = r.json()["data"]["result"]
            value = float(result[0]["value"][1]) if result else None
        except (httpx.TransportError, ValueError, KeyError):
            value = None  # Prometheus is still starting
        if value == want:
            return value
        time.sleep(0.5)
    return value
