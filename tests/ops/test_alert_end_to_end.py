"""End to end: a real Prometheus scraping a real palm-serve with the shipped alert rules
(docker/prometheus/alerts.yml, only their `for:` shortened) and the shipped scrape config
(only its intervals, target and rule path changed). The server runs one sequence at a time
with a long waiting queue; more than 200 long requests waiting must turn
PalmServeQueueSaturated from inactive to firing on /api/v1/alerts; once the clients go
away (their requests aborted, the queue empty) it must turn inactive again. The timings
are printed (pytest -s); docs/BENCHMARKS.md has one run's.

Skips where Debian's prometheus package is absent: .ci/run installs it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_helpers import free_port, running_server, write_model_dir  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "docker" / "prometheus"
ALERT = "PalmServeQueueSaturated"
WAITING_THRESHOLD = 200  # the shipped rule's: palm_num_requests_waiting > 200
FOR = "2s"  # the shipped rule says 5m
INTERVAL = "1s"  # scrape and evaluation (the shipped config says 5s)
# One running, the rest waiting: enough to stay over the threshold while each request in
# turn runs for seconds (MAX_TOKENS decode steps).
REQUESTS = WAITING_THRESHOLD + 30
MAX_TOKENS = 1500
DEADLINE_SECONDS = 40

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus binary on this machine (Debian's prometheus package has it)",
)


def rules_with_short_for(path: Path) -> dict:
    """The shipped rules with every `for:` shortened; expressions untouched."""
    rules = yaml.safe_load((SHIPPED / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return rules


def scrape_config(path: Path, target: str, rules: Path) -> None:
    """The shipped prometheus.yml with a short interval, this server, these rules."""
    config = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class Prometheus:
    def __init__(self, tmp_path: Path, target: str) -> None:
        rules = tmp_path / "alerts.yml"
        shipped = rules_with_short_for(rules)
        assert any(r.get("alert") == ALERT for g in shipped["groups"] for r in g["rules"])
        config = tmp_path / "prometheus.yml"
        scrape_config(config, target, rules)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    async def rule_state(self, client: httpx.AsyncClient) -> str | None:
        """The alert's state from /api/v1/rules: inactive, pending or firing (None: not
        evaluated yet, or Prometheus still starting)."""
        try:
            groups = (await client.get(f"{self.url}/api/v1/rules")).json()["data"]["groups"]
        except (httpx.TransportError, ValueError, KeyError):
            return None
        for group in groups:
            for rule in group["rules"]:
                evaluated = not rule.get("lastEvaluation", "0001").startswith("0001")
                if rule.get("name") == ALERT and evaluated:
                    return rule["state"]
        return None

    async def alert_states(self, client: httpx.AsyncClient) -> list[str]:
        """The alert's entries on /api/v1/alerts (pending or firing; none when inactive)."""
        alerts = (await client.get(f"{self.url}/api/v1/alerts")).json()["data"]["alerts"]
        return [a["state"] for a in alerts if a["labels"]["alertname"] == ALERT]

    async def up(self, client: httpx.AsyncClient) -> bool:
        try:
            r = await client.get(f"{self.url}/api/v1/query", params={"query": "up"})
            result = r.json()["data"]["result"]
        except (httpx.TransportError, ValueError, KeyError):
            return False
        return bool(result) and result[0]["value"][1] == "1"


async def wait_for(check, what: str, seconds: float = DEADLINE_SECONDS) -> float:
    """Poll `check` (async, -> bool) until true; the monotonic time it became so."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


async def saturate_then_release(server_url: str, prom: Prometheus) -> dict[str, float]:
    timings: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10) as api:
        await wait_for(lambda: prom.up(api), "Prometheus to scrape the server")
        await wait_for(
            lambda: _is(prom.rule_state(api), "inactive"), f"{ALERT} to be evaluated, inactive"
        )
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=120, limits=limits) as load:
            body = {"prompt": "hold", "max_tokens": MAX_TOKENS, "ignore_eos": True}
            start = time.monotonic()
            held = [
                asyncio.ensure_future(load.post(f"{server_url}/v1/generate", json=body))
                for _ in range(REQUESTS)
            ]
            seen = await watch_until_firing(prom, api)
            # Requests served one at a time may finish on a fast machine; the queue stays
            # over the threshold as long as fewer than the margin have.
            done = sum(task.done() for task in held)
            assert done < REQUESTS - WAITING_THRESHOLD, f"{done} held requests ended early"
            timings.update({f"load to {state}": t - start for state, t in seen.items()})
            released = time.monotonic()
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
        inactive = await wait_for(
            lambda: _is(prom.rule_state(api), "inactive"), f"{ALERT} to turn inactive"
        )
        assert await prom.alert_states(api) == []
        timings["release to inactive"] = inactive - released
    return timings


async def watch_until_firing(prom: Prometheus, api: httpx.AsyncClient) -> dict[str, float]:
    """When the alert was first seen pending, then firing, on /api/v1/alerts."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + DEADLINE_SECONDS
    while "firing" not in seen:
        assert time.monotonic() < deadline, f"{ALERT} never fired (seen: {sorted(seen)})"
        for state in await prom.alert_states(api):
            seen.setdefault(state, time.monotonic())
        await asyncio.sleep(0.1)
    return seen


async def _is(value, expected) -> bool:
    return await value == expected


def test_queue_saturation_fires_then_resolves(tmp_path: Path) -> None:
    model_dir = write_model_dir(tmp_path / "tiny", max_positions=MAX_TOKENS + 64)
    with running_server(
        model_dir, max_num_seqs=1, max_queue=REQUESTS, max_tokens_limit=MAX_TOKENS
    ) as server:
        prom = Prometheus(tmp_path, server.url.removeprefix("http://"))
        try:
            timings = asyncio.run(saturate_then_release(server.url, prom))
        finally:
            prom.close()
        assert server.state.lifecycle.inflight == 0
    print(
        f"\n{ALERT} (for: {FOR}, scrape and evaluation every {INTERVAL}): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    )
