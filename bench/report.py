"""Per-request measurements -> the benchmark report (throughput, TTFT, TPOT, ITL), its JSON
and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0  # tokens generated (server's usage, else counted)
    ttft: float = 0.0  # seconds from send to the first token
    latency: float = 0.0  # seconds from send to the last byte
    itl: list[float] = field(default_factory=list)  # gaps between token-bearing chunks
    start: float = 0.0  # send time, seconds since the run began
    error: str = ""


def summary(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / p50 / p90 / p99 in ms (scale), or zeros when there is nothing to summarise."""
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values) * scale
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def build_report(results: list[RequestResult], duration: float, meta: dict) -> dict:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        **meta,
        "duration_s": duration,
        "completed": len(done),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": summary([r.ttft for r in done]),
        "tpot_ms": summary(tpot),
        "itl_ms": summary([g for r in done for g in r.itl]),
        "e2e_latency_ms": summary([r.latency for r in done]),
    }


def format_report(report: dict) -> str:
    lines = [
        f"{report.get('label', 'server')}: {report['completed']} ok, {report['errors']} errors "
        f"in {report['duration_s']:.1f} s",
        f"  requests/s {report['request_throughput']:.2f}   output tok/s "
        f"{report['output_throughput']:.1f}   total tok/s {report['total_token_throughput']:.1f}",
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        s = report[key]
        lines.append(
            f"  {key:<15} mean {s['mean']:8.1f}  p50 {s['p50']:8.1f}  "
            f"p90 {s['p90']:8.1f}  p99 {s['p99']:8.1f}"
        )
    for example in report["error_examples"]:
        lines.append(f"  error: {example}")
    return "\n".join(lines)


def write_json(report: dict, results: list[RequestResult], path: str | Path) -> None:
    payload = {**report, "requests": [asdict(r) for r in results]}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def plot(results: list[RequestResult], report: dict, path: str | Path) -> None:
    """Three panels: TTFT and TPOT histograms, and each request's span over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=80)
    axes[0].hist([r.ttft * 1000 for r in done], bins=30, color="tab:blue")
    axes[0].set(title="TTFT", xlabel="ms", ylabel="requests")
    tpot = [(r.latency - r.ttft) / (r.output_len - 1) * 1000 for r in done if r.output_len > 1]
    axes[1].hist(tpot, bins=30, color="tab:orange")
    axes[1].set(title="TPOT", xlabel="ms / token")
    for i, r in enumerate(sorted(done, key=lambda r: r.start)):
        axes[2].plot([r.start, r.start + r.ttft], [i, i], color="tab:red", lw=1)
        axes[2].plot([r.start + r.ttft, r.start + r.latency], [i, i], color="tab:green", lw=1)
    axes[2].set(title="requests: waiting+prefill (red), decode (green)", xlabel="s")
    fig.suptitle(
        f"{report.get('label', '')}: {report['output_throughput']:.0f} output tok/s, "
        f"TTFT p50 {report['ttft_ms']['p50']:.0f} ms"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
