"""Where should the engine core and the front run? The standard burst served by palm-serve
under several placements, and the same requests replayed through the engine without HTTP,
interleaved round by round so that a noisy shared machine hits every row alike.

Served rows start `palm-serve serve` with the row's flags and environment, wait for
/ready, run bench/serving.py against it (its own process, unpinned, as in the peer
comparison) and stop it. Replay rows run bench/engine_replay.py with the row's threads,
OpenMP wait policy and CPUs (taskset). Every row sees the same requests (--seed).

    .venv/bin/python bench/placements.py [--rounds 3] [--rows thread,core1,core2] \\
        [--seed 11] [--json bench/results/placements.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TINY_LLAMA = BENCH / ".venvs" / "models" / "tiny-llama"
PYTHON = sys.executable
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    # Served rows: extra `palm-serve serve` flags; replay rows: None.
    flags: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Replay rows: torch threads and CPUs (taskset -c).
    threads: int = 2
    cpus: str | None = None


ROWS = {
    r.name: r
    for r in [
        Row("thread", "served, core in a thread of the server (--no-engine-process)",
            ("--no-engine-process",)),
        Row("core1", "served, core process: 1 thread on CPU 1, spinning; front on CPU 0",
            ("--engine-cpus", "1", "--front-cpus", "0"), {"OMP_WAIT_POLICY": "ACTIVE"}),
        Row("core1-passive", "served, core process: 1 thread on CPU 1, sleeping; front CPU 0",
            ("--engine-cpus", "1", "--front-cpus", "0"), {"OMP_WAIT_POLICY": "PASSIVE"}),
        Row("core2", "served, core process: 2 threads on CPUs 0-1, sleeping; front unpinned",
            ("--engine-cpus", "0-1"), {"OMP_WAIT_POLICY": "PASSIVE"}),
        Row("core2-spin", "served, core process: 2 threads on CPUs 0-1, spinning; front "
            "unpinned", ("--engine-cpus", "0-1"), {"OMP_WAIT_POLICY": "ACTIVE"}),
        Row("default", "served, palm-serve's default placement", ()),
        Row("one-pass", "served, default placement, one forward pass per step "
            "(--num-scheduler-steps 1)", ("--num-scheduler-steps", "1")),
        Row("graph", "served, default placement, the step as the torch.compile graph "
            "(--no-fused-step)", ("--no-fused-step",)),
        Row("replay2", "engine only: 2 threads, spinning", None, {"OMP_WAIT_POLICY": "ACTIVE"}),
        Row("replay2-passive", "engine only: 2 threads, sleeping", None,
            {"OMP_WAIT_POLICY": "PASSIVE"}),
        Row("replay1", "engine only: 1 thread on CPU 1, spinning", None,
            {"OMP_WAIT_POLICY": "ACTIVE"}, threads=1, cpus="1"),
    ]
}  # fmt: skip


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(row: Row, args: argparse.Namespace, out: Path) -> dict:
    port = free_port()
    command = [
        str(REPO / ".venv" / "bin" / "palm-serve"), "serve", "--model", str(args.model),
        "--served-model-name", "tiny-llama", "--port", str(port), "--device", "cpu",
        "--dtype", "float32", "--max-num-seqs", str(args.max_concurrency),
        "--kv-cache-memory", "2GiB", "--log-level", "warning", *(row.flags or ()),
    ]  # fmt: skip
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, env=clean_env(row.env), stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        client = [
            PYTHON, str(BENCH / "serving.py"), "--base-url", url, "--model", "tiny-llama",
            "--tokenizer", str(args.model / "tokenizer.json"),
            "--num-requests", str(args.num_requests), "--input-len", args.input_len,
            "--output-len", args.output_len, "--max-concurrency", str(args.max_concurrency),
            "--seed", str(args.seed),
            "--extra-body", '{"ignore_eos": true, "stream_options": {"include_usage": true}}',
            "--json", str(out), "--no-progress", "--label", row.name,
        ]  # fmt: skip
        subprocess.run(client, env=clean_env({}), check=True, stdout=subprocess.DEVNULL)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    report = json.loads(out.read_text())
    return {
        "seconds": report["duration_s"],
        "output_tok_s": report["output_throughput"],
        "ttft_p50_ms": report["ttft_ms"]["p50"],
        "ttft_p99_ms": report["ttft_ms"]["p99"],
        "tpot_p50_ms": report["tpot_ms"]["p50"],
        "itl_p50_ms": report["itl_ms"]["p50"],
        "itl_p99_ms": report["itl_ms"]["p99"],
        "errors": report["errors"],
    }


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server was not ready in time")


def replay_once(row: Row, args: argparse.Namespace, out: Path) -> dict:
    command = [
        PYTHON, str(BENCH / "engine_replay.py"), "--model", str(args.model),
        "--num-requests", str(args.num_requests), "--input-len", args.input_len,
        "--output-len", args.output_len, "--max-num-seqs", str(args.max_concurrency),
        "--seed", str(args.seed), "--threads", str(row.threads), "--json", str(out),
        "--kernel-backend", "auto",
    ]  # fmt: skip
    if row.cpus is not None:
        command = ["taskset", "-c", row.cpus, *command]
    subprocess.run(command, env=clean_env(row.env), check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return {"seconds": report["seconds"], "output_tok_s": report["output_throughput"]}


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=TINY_LLAMA)
    p.add_argument("--rows", default="thread,core1,core2,replay2,replay1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--input-len", default="32-512")
    p.add_argument("--output-len", default="16-256")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out-dir", type=Path, default=BENCH / "results" / "placements")
    p.add_argument("--json", type=Path, help="all runs and medians")
    args = p.parse_args()
    rows = [ROWS[name] for name in args.rows.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {r.name: [] for r in rows}
    for k in range(args.rounds):
        for row in rows:
            out = args.out_dir / f"{row.name}-{k}.json"
            before, started = load_average(), time.strftime("%H:%M:%S")
            run = (serve_once if row.flags is not None else replay_once)(row, args, out)
            run.update(round=k, started=started, load_before=before)
            runs[row.name].append(run)
            print(json.dumps({"row": row.name, **run}), flush=True)
    medians = {
        name: {
            key: statistics.median(r[key] for r in rs)
            for key in rs[0]
            if key not in ("round", "started")
        }
        for name, rs in runs.items()
    }
    print("\n| row | what | seconds (per run) | output tok/s | TTFT p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        m, rs = medians[row.name], runs[row.name]
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        ttft = f"{m['ttft_p50_ms']:.0f} / {m['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in m else "-"
        print(
            f"| {row.name} | {row.what} | **{m['seconds']:.1f}** ({each}) | "
            f"{m['output_tok_s']:.0f} | {ttft} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
