"""A rolling restart for real: two `palm-serve serve` replicas (subprocesses on their own
ports) behind HAProxy (Debian's package) health-checking /ready, a steady stream of
requests through it (every other one streamed over SSE), and each replica in turn stopped
with SIGTERM, waited for, started again and waited for until HAProxy sends to it again.
Counts the requests that failed: a status other than 200, a transport error, or a stream
that did not end with a finish reason and `data: [DONE]`.

    python bench/rollout.py --requests 300 --json rollout.json

What makes zero failures possible, each part checked here:
- the server withdraws from /ready at SIGTERM but keeps admitting for --drain-delay
  seconds, longer than HAProxy takes to mark it down (check interval x fall), so no
  request reaches it after it starts refusing (DrainingServer, server/lifecycle.py);
- the drain lets requests in flight, streams included, finish before the server exits;
- HAProxy retries on another replica (retries + option redispatch) only where the
  client has received nothing and the replica did not generate (see RETRY_ON).
docs/DEPLOY.md has the figures and the command that measured them."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

# Retried on another replica: the connection failed (the request never reached a
# server), the server closed without a byte of answer (a keep-alive connection it was
# closing), or it answered 503 (palm-serve sends 503 only for a request it refused before
# generating: draining, or its engine is down). A generate changes no state, but a retry
# still costs a generation; so not response-timeout (a slow generation still running would
# run twice, when the replica is already overloaded) nor 500/502/504. HAProxy never
# retries once it has sent the client any of the answer, so a stream cut mid-way fails.
RETRY_ON = "conn-failure empty-response 503"
# HAProxy's /ready check: every CHECK_INTERVAL_MS, FALL failures in a row mark a replica
# down, RISE successes up again. A check may take CHECK_TIMEOUT_S: a replica that serves
# alone while the other restarts answers slowly on a loaded machine, and a check timing out
# at the interval (HAProxy's default) took the last replica out.
CHECK_INTERVAL_MS = 500
FALL = 2
RISE = 2
CHECK_TIMEOUT_S = 2
# The server's --drain-delay: twice the time HAProxy takes to see a withdrawn /ready.
DRAIN_DELAY_S = 2 * FALL * CHECK_INTERVAL_MS / 1000


def haproxy_config(
    port: int, replica_ports: list[int], stats_socket: Path, retry_on: str = RETRY_ON
) -> str:
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(replica_ports))
    retries = f"    retry-on {retry_on}\n" if retry_on != "none" else ""
    return f"""global
    stats socket {stats_socket} mode 600 level admin
    maxconn 1024

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout queue 30s
    timeout http-keep-alive 5s
    timeout check {CHECK_TIMEOUT_S}s
    retries 3
    option redispatch 1
{retries}    # A retry needs the whole request in HAProxy's buffer (bodies here are small).
    option http-buffer-request

frontend palm
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk
    http-check send meth GET uri /ready
    http-check expect status 200
    default-server inter {CHECK_INTERVAL_MS}ms fall {FALL} rise {RISE}
    http-response set-header X-Served-By %s
{servers}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, seconds: float) -> float:
    """Poll check() until it is true; the seconds it took. Raises after `seconds`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise TimeoutError(f"{what}: not after {seconds:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


class Replica:
    """One `palm-serve serve` subprocess on a fixed port (so HAProxy's address stays)."""

    def __init__(self, name: str, port: int, server_args: list[str], log_dir: Path) -> None:
        self.name, self.port, self.server_args = name, port, server_args
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "palm_serve.server.cli", "serve"]
        command += ["--port", str(self.port), *self.server_args]
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}: see {self.log_path}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def terminate(self, seconds: float) -> int:
        """SIGTERM and wait for the exit; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(seconds)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class HAProxy:
    def __init__(self, port: int, replica_ports: list[int], work: Path, retry_on: str) -> None:
        self.port = port
        self.socket_path = work / "haproxy.sock"
        self.config_path = work / "haproxy.cfg"
        self.config_path.write_text(haproxy_config(port, replica_ports, self.socket_path, retry_on))
        self.log_path = work / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its config: {check.stderr}")
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config_path)], stdout=log, stderr=log
            )
        wait_for("haproxy's stats socket", self.socket_path.exists, 10)

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's `show stat` of the backend's rows, by server name."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            data = b"".join(iter(lambda: s.recv(65536), b""))
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas"}

    def is_up(self, server: str) -> bool:
        return self.stats()[server]["status"] == "UP"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Outcome:
    started: float  # seconds since the load began
    seconds: float
    streamed: bool
    ok: bool
    served_by: str
    error: str = ""


def one_request(client: httpx.Client, url: str, streamed: bool, max_tokens: int) -> Outcome:
    body = {"prompt": "In the beginning", "max_tokens": max_tokens, "stream": streamed}
    body["temperature"] = 0.0
    started = time.monotonic()
    outcome = Outcome(started, 0.0, streamed, False, "")
    try:
        with client.stream("POST", f"{url}/v1/generate", json=body) as response:
            outcome.served_by = response.headers.get("x-served-by", "")
            if response.status_code != 200:
                response.read()
                outcome.error = f"{response.status_code} {response.text[:200]}"
            elif streamed:
                outcome.ok, outcome.error = _stream_complete(response.iter_lines())
            else:
                finish = json.loads(response.read()).get("finish_reason")
                outcome.ok = finish in ("length", "stop")
                outcome.error = "" if outcome.ok else f"finish_reason {finish}"
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.monotonic() - started
    return outcome


def _stream_complete(lines: Iterator[str]) -> tuple[bool, str]:
    """(ok, why not): a finish reason of length or stop, then [DONE], then the end."""
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return False, f"stream cut after {len(events)} events"
    finish = json.loads(events[-2]).get("finish_reason") if len(events) > 1 else None
    return finish in ("length", "stop"), "" if finish in ("length", "stop") else f"{finish}"


class Load:
    """`concurrency` clients, each sending one request after another through `url` until
    stopped; every other request streamed."""

    def __init__(self, url: str, concurrency: int, max_tokens: int) -> None:
        self.url, self.concurrency, self.max_tokens = url, concurrency, max_tokens
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.began = time.monotonic()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,)) for i in range(concurrency)
        ]

    def start(self) -> None:
        self.began = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join()

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = index
            while not self.stopping.is_set():
                outcome = one_request(client, self.url, n % 2 == 0, self.max_tokens)
                outcome.started -= self.began
                with self._lock:
                    self.outcomes.append(outcome)
                n += 1


@dataclass
class Restart:
    replica: str
    signalled_at: float  # seconds since the load began
    exit_code: int
    exit_seconds: float  # SIGTERM -> process gone (the drain)
    ready_seconds: float  # start -> /ready 200 (model load, compile from cache)
    back_seconds: float  # start -> HAProxy marks it UP
    requests_meanwhile: int = 0  # requests that began between the signal and UP
    inflight_at_signal: int = 0  # requests this replica was serving when it was signalled


@dataclass
class RolloutReport:
    requests: int
    failed: int
    streamed: int
    seconds: float
    served_by: dict[str, int]
    restarts: list[Restart]
    haproxy_retries: int
    haproxy_redispatches: int
    drain_delay: float
    retry_on: str
    failures: list[dict] = field(default_factory=list)


def restart(replica: Replica, proxy: HAProxy, load: Load, drain_timeout: float) -> Restart:
    signalled = time.monotonic()
    code = replica.terminate(drain_timeout + 60)
    exited = time.monotonic() - signalled
    started = time.monotonic()
    replica.start()
    ready = wait_for(f"{replica.name} ready", replica.ready, 600)
    wait_for(f"{replica.name} UP in haproxy", lambda: proxy.is_up(replica.name), 30)
    back = time.monotonic() - started
    return Restart(replica.name, signalled - load.began, code, exited, ready, back)


def count_meanwhile(report_restarts: list[Restart], outcomes: list[Outcome]) -> None:
    for r in report_restarts:
        end = r.signalled_at + r.exit_seconds + r.back_seconds
        r.requests_meanwhile = sum(1 for o in outcomes if r.signalled_at <= o.started <= end)
        r.inflight_at_signal = sum(
            1
            for o in outcomes
            if o.served_by == r.replica and o.started < r.signalled_at < o.started + o.seconds
        )


@contextmanager
def cluster(
    server_args: list[str], retry_on: str, work: Path
) -> Iterator[tuple[list[Replica], HAProxy]]:
    ports = [free_port(), free_port()]
    replicas = [Replica(f"r{i}", p, server_args, work) for i, p in enumerate(ports)]
    proxy = HAProxy(free_port(), ports, work, retry_on)
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            wait_for(f"{r.name} ready", r.ready, 600)
        proxy.start()
        for r in replicas:
            wait_for(f"{r.name} UP in haproxy", lambda r=r: proxy.is_up(r.name), 30)
        yield replicas, proxy
    finally:
        proxy.stop()
        for r in replicas:
            r.kill()


def run_rollout(
    requests: int,
    concurrency: int,
    max_tokens: int,
    server_args: list[str],
    drain_timeout: float,
    retry_on: str = RETRY_ON,
    restarts: int = 2,
    work: Path | None = None,
) -> RolloutReport:
    """Restart replicas r0, r1, r0, ... (`restarts` in all) under load; the load goes on
    until both `requests` were sent and every restart is over."""
    work = work or Path(tempfile.mkdtemp(prefix="palm-rollout-"))
    with cluster(server_args, retry_on, work) as (replicas, proxy):
        load = Load(f"http://127.0.0.1:{proxy.port}", concurrency, max_tokens)
        load.start()
        try:
            done = []
            for i in range(restarts):
                # Each restart begins with requests in flight on both replicas.
                target = load.count() + max(concurrency * 2, requests // (restarts + 2))
                wait_for("load before a restart", lambda t=target: load.count() >= t, 600)
                done.append(restart(replicas[i % 2], proxy, load, drain_timeout))
            wait_for("the requests", lambda: load.count() >= requests, 1200)
        finally:
            load.stop()
        stats = proxy.stats()
    return summarize(load, done, stats, server_args, retry_on)


def summarize(
    load: Load, done: list[Restart], stats: dict, server_args: list[str], retry_on: str
) -> RolloutReport:
    outcomes = load.outcomes
    count_meanwhile(done, outcomes)
    served: dict[str, int] = {}
    for o in outcomes:
        served[o.served_by or "?"] = served.get(o.served_by or "?", 0) + 1
    delay = float(server_args[server_args.index("--drain-delay") + 1])
    failed = [o for o in outcomes if not o.ok]
    return RolloutReport(
        requests=len(outcomes),
        failed=len(failed),
        streamed=sum(o.streamed for o in outcomes),
        seconds=max(o.started + o.seconds for o in outcomes),
        served_by=dict(sorted(served.items())),
        restarts=done,
        haproxy_retries=sum(int(stats[s]["wretr"] or 0) for s in ("r0", "r1")),
        haproxy_redispatches=sum(int(stats[s]["wredis"] or 0) for s in ("r0", "r1")),
        drain_delay=delay,
        retry_on=retry_on,
        failures=[asdict(o) for o in failed[:20]],
    )


def format_report(report: RolloutReport) -> str:
    lines = [
        f"requests {report.requests} ({report.streamed} streamed) in {report.seconds:.1f} s: "
        f"{report.failed} failed",
        f"served by {report.served_by}; haproxy retries {report.haproxy_retries}, "
        f"redispatches {report.haproxy_redispatches} (retry-on {report.retry_on}; "
        f"drain delay {report.drain_delay:g} s)",
    ]
    for r in report.restarts:
        lines.append(
            f"restart {r.replica} at {r.signalled_at:.1f} s: exit {r.exit_code} after "
            f"{r.exit_seconds:.1f} s, ready {r.ready_seconds:.1f} s after start, back in "
            f"haproxy {r.back_seconds:.1f} s after start; {r.inflight_at_signal} of its requests "
            f"running at the signal, {r.requests_meanwhile} begun meanwhile"
        )
    lines += [f"failed: {f['error']}" for f in report.failures]
    return "\n".join(lines)


def server_args_for(args: argparse.Namespace) -> list[str]:
    # Two replicas share this machine: each engine one thread, on any CPU.
    server = ["--drain-timeout", str(args.drain_timeout), "--drain-delay", str(args.drain_delay)]
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    server += ["--engine-threads", "1", "--engine-cpus", cpus, "--log-level", "warning"]
    if args.model:
        server += ["--model", str(args.model)]
    return server + args.server_arg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="at least this many, in all")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--restarts", type=int, default=2, help="SIGTERM restarts, r0 r1 r0 ...")
    p.add_argument("--model", type=Path, help="default: the model that ships with palm-serve")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument(
        "--drain-delay",
        type=float,
        default=DRAIN_DELAY_S,
        help="the server's --drain-delay; past HAProxy's check interval x fall",
    )
    p.add_argument("--retry-on", default=RETRY_ON, help="HAProxy's retry-on ('none': off)")
    p.add_argument("--server-arg", action="append", default=[], help="more serve flags")
    p.add_argument("--json", type=Path, help="write the report here too")
    args = p.parse_args()
    # A SIGTERM to the benchmark unwinds it, so its replicas and HAProxy are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run_rollout(
        args.requests,
        args.concurrency,
        args.max_tokens,
        server_args_for(args),
        args.drain_timeout,
        args.retry_on,
        args.restarts,
    )
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
