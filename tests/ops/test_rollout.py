"""bench/rollout.py, small: two `palm-serve serve` replicas of a tiny model behind HAProxy,
60 requests (half streamed) through it while one replica is restarted with SIGTERM; none
may fail, and both replicas must have served. Skips where Debian's haproxy is absent:
.ci/run installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "server"))

from rollout import DRAIN_DELAY_S, RETRY_ON, format_report, haproxy_config, run_rollout  # noqa: E402

from server_helpers import write_model_dir  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="no haproxy on this machine (Debian's haproxy package; .ci/run installs it)",
)


def server_args(model_dir: Path, drain_delay: float) -> list[str]:
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    return [
        *("--engine-cpus", cpus),
        *("--model", str(model_dir), "--kernel-backend", "torch", "--device", "cpu"),
        *("--num-kv-blocks", "512", "--engine-threads", "1", "--log-level", "warning"),
        *("--drain-timeout", "30", "--drain-delay", str(drain_delay)),
    ]


def test_a_restart_under_load_fails_no_request(tmp_path):
    model_dir = write_model_dir(tmp_path / "tiny")
    report = run_rollout(
        requests=60,
        concurrency=4,
        max_tokens=16,
        server_args=server_args(model_dir, DRAIN_DELAY_S),
        drain_timeout=30,
        restarts=1,
        work=tmp_path,
    )
    print(format_report(report))
    assert report.failed == 0, format_report(report)
    assert report.requests >= 60 and report.streamed >= 28
    [restart] = report.restarts
    assert restart.exit_code == 0  # drained, not killed
    # Requests were running when the signal came (the drain let them finish: none failed),
    # and the load went on through the restart.
    assert restart.inflight_at_signal > 0 and restart.requests_meanwhile > 0
    assert set(report.served_by) == {"r0", "r1"}


def test_haproxy_accepts_the_generated_config(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(18000, [18001, 18002], tmp_path / "s.sock", RETRY_ON))
    run = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"retry-on {RETRY_ON}" in config.read_text()
