"""An async HTTP load generator for any OpenAI-compatible server (/v1/completions, streaming).

Requests arrive all at once (--rate inf) or as a Poisson process (--rate R per second),
at most --max-concurrency in flight; prompt and output lengths are drawn from a seeded
distribution (bench/workloads.py). Reports request and token throughput, TTFT, TPOT and ITL
(mean / p50 / p90 / p99) and errors; writes JSON and a PNG plot.

    .venv/bin/python bench/serving.py --base-url http://127.0.0.1:8000 --model tiny-llama \
        --tokenizer bench/.venvs/models/tiny-llama/tokenizer.json \
        --num-requests 16 --input-len 64 --output-len 64 --rate inf --max-concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from report import RequestResult, build_report, format_report, plot, write_json  # noqa: E402
from workloads import BenchRequest, LengthSpec, make_requests  # noqa: E402


@dataclass
class LoadConfig:
    base_url: str
    model: str
    rate: float = float("inf")  # requests per second (Poisson); inf: all at once
    max_concurrency: int = 16
    seed: int = 0
    timeout: float = 600.0
    # Extra JSON fields per request, e.g. {"ignore_eos": true} where the server knows them.
    extra_body: dict = field(default_factory=dict)
    # Send min_tokens = max_tokens (vLLM, palm-serve) so outputs have the requested length.
    min_tokens: bool = False
    progress: bool = True
    label: str = ""


def request_body(req: BenchRequest, cfg: LoadConfig) -> dict:
    body = {
        "model": cfg.model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        **cfg.extra_body,
    }
    if cfg.min_tokens:
        body["min_tokens"] = req.output_len
    return body


async def send(client: httpx.AsyncClient, req: BenchRequest, cfg: LoadConfig, t0: float):
    """One streamed completion; times the first token and the gaps between chunks."""
    result = RequestResult(ok=False, prompt_len=req.prompt_len)
    sent = time.perf_counter()
    result.start = sent - t0
    last, chunks, usage = sent, 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=request_body(req, cfg)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:200]
                result.error = f"HTTP {resp.status_code}: {body}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last, chunks = now, chunks + 1
        result.latency = time.perf_counter() - sent
        # Token count: the server's usage when it streams one; else chunks (one per token
        # for the servers here, a lower bound when a server merges tokens).
        result.output_len = (usage or {}).get("completion_tokens") or chunks
        result.ok = chunks > 0
        result.error = "" if result.ok else "no token streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def arrivals(n: int, rate: float, seed: int):
    """Yield request indices, spaced by exponential gaps (Poisson) unless rate is inf."""
    rng = random.Random(seed)
    for i in range(n):
        yield i
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def run_load(requests: list[BenchRequest], cfg: LoadConfig) -> dict:
    """Run the whole load; returns the report (plus 'results', the per-request list)."""
    limits = httpx.Limits(max_connections=cfg.max_concurrency + 4)
    timeout = httpx.Timeout(cfg.timeout, connect=30.0)
    gate = asyncio.Semaphore(cfg.max_concurrency)
    bar = _progress(len(requests), cfg)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as client:

        async def one(req: BenchRequest) -> RequestResult:
            async with gate:
                result = await send(client, req, cfg, t0)
            if bar is not None:
                bar.update(1)
            return result

        t0 = time.perf_counter()
        tasks = []
        async for i in arrivals(len(requests), cfg.rate, cfg.seed):
            tasks.append(asyncio.create_task(one(requests[i])))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    meta = {
        "label": cfg.label,
        "rate": str(cfg.rate),
        "max_concurrency": cfg.max_concurrency,
        "num_requests": len(requests),
    }
    return {**build_report(results, duration, meta), "results": results}


def _progress(total: int, cfg: LoadConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=cfg.label or "requests", unit="req", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True, help="model name sent in each request")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json that sizes the prompts")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", default="64", help="64 | 32-512 | sharegpt:32-512:128")
    p.add_argument("--output-len", default="64", help="64 | 16-256 | sharegpt:16-256:64")
    p.add_argument("--rate", type=float, default=float("inf"), help="requests/s; inf = burst")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra-body", default="{}", help="JSON merged into each request body")
    p.add_argument("--min-tokens", action="store_true", help="send min_tokens = max_tokens")
    p.add_argument("--label", default="")
    p.add_argument("--json", type=Path, help="write the report (with every request) here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    requests = make_requests(
        args.num_requests,
        LengthSpec.parse(args.input_len),
        LengthSpec.parse(args.output_len),
        args.tokenizer,
        args.seed,
    )
    cfg = LoadConfig(
        base_url=args.base_url,
        model=args.model,
        rate=args.rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        extra_body=json.loads(args.extra_body),
        min_tokens=args.min_tokens,
        progress=not args.no_progress,
        label=args.label,
    )
    report = asyncio.run(run_load(requests, cfg))
    results = report.pop("results")
    print(format_report(report))
    if args.json:
        write_json(report, results, args.json)
    if args.plot:
        plot(results, report, args.plot)
    return report


if __name__ == "__main__":
    main()
