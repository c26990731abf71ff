"""How long the engine core takes to stop on SIGTERM under load: `palm-serve serve` (the
default model unless --model), a few streams running, SIGTERM to the front; the time from
the front's end of drain (its "drain complete" or "drain timed out" log line, right before
it stops the engine) to the core process's exit (its pid gone, polled every 10 ms). Each
--python is a checkout's interpreter (e.g. main's .venv and a branch's), run in turn,
--runs rounds interleaved; medians printed.

    python bench/core_stop.py --python /work/main/.venv/bin/python \\
        --python .venv/bin/python --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import threading
import time
from datetime import datetime

import httpx
from placements import wait_ready

STREAM = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
DRAIN_ENDS = ("drain complete", "drain timed out")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain_end(log: str) -> tuple[datetime, str]:
    for line in log.splitlines():
        for marker in DRAIN_ENDS:
            if marker in line and (m := STAMP.match(line)):
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), marker
    raise RuntimeError(f"no end of drain in the server's log:\n{log[-2000:]}")


def core_of(front: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    spawned = b"spawn_main" in f.read()
            except OSError:
                continue
            if parent == front and spawned:
                return int(entry)
    raise RuntimeError("no engine core process")


def watch_exit(pid: int, gone: list[datetime]) -> None:
    while os.path.exists(f"/proc/{pid}/stat"):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    gone.append(datetime.now())


def stream(url: str, body: dict) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                pass
    except httpx.HTTPError:
        pass  # cut by the drain's timeout: expected


def one_stop(python: str, args: argparse.Namespace) -> float:
    port = free_port()
    argv = [python, "-m", "palm_serve.server.cli", "serve", "--port", str(port)]
    argv += ["--log-level", "info", "--drain-timeout", str(args.drain_timeout)]
    argv += ["--engine-threads", "1", *(["--model", args.model] if args.model else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    gone: list[datetime] = []
    watcher = threading.Thread(target=watch_exit, args=(core_of(proc.pid), gone), daemon=True)
    watcher.start()
    body = {**STREAM, "ignore_eos": args.ignore_eos}
    for _ in range(args.streams):
        threading.Thread(target=stream, args=(url, body), daemon=True).start()
    time.sleep(args.load_seconds)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    reader.join(10)
    watcher.join(10)
    log = "".join(out)
    start, how = drain_end(log)
    seconds = (gone[0] - start).total_seconds()
    killed = " (killed)" if "did not stop in" in log else ""
    print(f"{python}: {how}, core stop {seconds:.2f} s{killed}", flush=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", action="append", required=True, help="an interpreter; repeat")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", help="default: the model that ships with palm-serve")
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--load-seconds", type=float, default=3.0)
    p.add_argument("--drain-timeout", type=float, default=1.0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="streams run their 400 tokens (the drain times out and aborts them); off: "
        "they end at EOS, the drain completes",
    )
    args = p.parse_args()
    times: dict[str, list[float]] = {py: [] for py in args.python}
    for _ in range(args.runs):
        for py in args.python:
            times[py].append(one_stop(py, args))
    for py, ts in times.items():
        each = ", ".join(f"{t:.2f}" for t in ts)
        print(f"| {py} | {statistics.median(ts):.2f} s | {each} |")


if __name__ == "__main__":
    main()
