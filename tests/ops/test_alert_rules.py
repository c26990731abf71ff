"""The Prometheus alert rules (docker/prometheus/alerts.yml) under `promtool test rules`:
synthetic series for each situation an operator must hear of, and the exact set of alerts
that must fire then, every other alert staying silent; plus a healthy server on which none
fires. Skips where Debian's prometheus package (promtool) is absent: .ci/run installs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "docker" / "prometheus" / "alerts.yml"
INSTANCE = "a:8000"
L = f'job="palm-serve", instance="{INSTANCE}"'

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="no promtool on this machine (Debian's prometheus package has it)",
)


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _histogram(name: str, slow: bool) -> list[dict]:
    """Buckets of a latency histogram whose observations are all fast (< 0.1 s) or all
    slow (between 5 and 10 s): 10 a minute."""
    per_minute = {"0.1": 0 if slow else 10, "10": 10, "+Inf": 10}
    return [
        {"series": f'{name}_bucket{{{L}, le="{le}"}}', "values": f"0+{n}x20"}
        for le, n in per_minute.items()
    ]


HEALTHY = [
    {"series": f"up{{{L}}}", "values": "1x20"},
    {"series": f"palm_engine_restarts_total{{{L}}}", "values": "0x20"},
    {"series": f"palm_num_requests_waiting{{{L}}}", "values": "3x20"},
    {"series": f"palm_kv_cache_usage_ratio{{{L}}}", "values": "0.4x20"},
    {"series": f"palm_num_preemptions_total{{{L}}}", "values": "0x20"},
    {"series": f'palm_http_requests_total{{{L}, status="200"}}', "values": "0+60x20"},
    {"series": f'palm_requests_finished_total{{{L}, finish_reason="error"}}', "values": "0x20"},
    *_histogram("palm_time_to_first_token_seconds", slow=False),
    *_histogram("palm_inter_token_latency_seconds", slow=False),
]


def _with(*replacements: dict) -> list[dict]:
    """HEALTHY with some series replaced (by name and labels) or added."""
    names = {r["series"] for r in replacements}
    return [s for s in HEALTHY if s["series"] not in names] + list(replacements)


SCENARIOS = {
    "healthy": (HEALTHY, set()),
    "down": (_with({"series": f"up{{{L}}}", "values": "1 1 0x18"}), {"PalmServeDown"}),
    "core restarted": (
        _with({"series": f"palm_engine_restarts_total{{{L}}}", "values": "0x5 1x15"}),
        {"PalmServeEngineRestarted"},
    ),
    "queue full": (
        _with({"series": f"palm_num_requests_waiting{{{L}}}", "values": "250x20"}),
        {"PalmServeQueueSaturated"},
    ),
    "429s": (
        _with({"series": f'palm_http_requests_total{{{L}, status="429"}}', "values": "0+60x20"}),
        {"PalmServeQueueSaturated"},
    ),
    "kv full, preempting": (
        _with(
            {"series": f"palm_kv_cache_usage_ratio{{{L}}}", "values": "0.99x20"},
            {"series": f"palm_num_preemptions_total{{{L}}}", "values": "0+5x20"},
        ),
        {"PalmServeKVCacheFull"},
    ),
    "kv full, not preempting": (
        _with({"series": f"palm_kv_cache_usage_ratio{{{L}}}", "values": "0.99x20"}),
        set(),
    ),
    "slow first tokens": (
        _with(*_histogram("palm_time_to_first_token_seconds", slow=True)),
        {"PalmServeSlowFirstToken"},
    ),
    "slow tokens": (
        _with(*_histogram("palm_inter_token_latency_seconds", slow=True)),
        {"PalmServeSlowTokens"},
    ),
    "5xx": (
        _with({"series": f'palm_http_requests_total{{{L}, status="503"}}', "values": "0+6x20"}),
        {"PalmServeServerErrors"},
    ),
    "errors": (
        _with(
            {
                "series": f'palm_requests_finished_total{{{L}, finish_reason="error"}}',
                "values": "0+2x20",
            }  # fmt: skip
        ),
        {"PalmServeRequestErrors"},
    ),
}


def _expected(rule: dict, fired: bool, labels: dict[str, str]) -> list[dict]:
    if not fired:
        return []
    annotations = {
        k: v.replace("{{ $labels.instance }}", INSTANCE) for k, v in rule["annotations"].items()
    }
    return [{"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}]


def test_promtool_accepts_the_rules() -> None:
    run = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_exactly_the_expected_alerts_fire(scenario: str, tmp_path: Path) -> None:
    series, firing = SCENARIOS[scenario]
    alerts = _alerts()
    assert firing <= set(alerts)
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": name,
                        "exp_alerts": _expected(
                            rule, name in firing, {"instance": INSTANCE, "job": "palm-serve"}
                        ),
                    }
                    for name, rule in sorted(alerts.items())
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
