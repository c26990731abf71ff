"""A serving workload straight through LLMEngine, without HTTP: what the serving layer costs.

The same kind of requests bench/serving.py sends (seeded prompt and output lengths, text
prompts tokenized by the model's tokenizer) are all added at once to an engine set up as
the server sets it up (the same kernel backend choice, prepacked linears, --max-num-seqs),
then `step()` runs until every request is done. Compare its output tok/s with
bench/serving.py's burst figure against `palm-serve serve` on the same model: the
difference is HTTP, SSE, the event loop, the process boundary and the client sharing the
cores. OpenMP reads its environment when torch loads, so set OMP_WAIT_POLICY (and
taskset -c for the CPUs) as the engine runs in the server: bench/placements.py does.
--compile: the compiled step (model/compiled.py), compiled before the clock starts.
--kv-cache-dtype: the KV pool in bfloat16 or float16 (`palm-serve serve --kv-cache-dtype`).

    .venv/bin/python bench/engine_replay.py [--num-requests 100] [--input-len 32-512]
        [--output-len 16-256] [--max-num-seqs 32] [--seed 7] [--threads 2]
        [--kernel-backend auto] [--compile] [--kv-cache-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from workloads import LengthSpec, make_requests

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine, load_served_model
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.model import load_tokenizer

TINY_LLAMA = Path(__file__).resolve().parent / ".venvs" / "models" / "tiny-llama"


def replay(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_served_model(
        args.model,
        kernel_backend=args.kernel_backend,
        prepack_cpu_linears=not args.no_prepack,
        compile=args.compile,
        kv_cache_dtype=args.kv_cache_dtype,
    ).requires_grad_(False)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    requests = make_requests(
        args.num_requests,
        LengthSpec.parse(args.input_len),
        LengthSpec.parse(args.output_len),
        args.model / "tokenizer.json",
        args.seed,
    )
    block_size = EngineConfig().block_size
    # Room for every request at once: the replay measures steps, not preemption.
    blocks = sum((r.prompt_len + r.output_len) // block_size + 2 for r in requests)
    config = EngineConfig(
        num_blocks=blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    engine = build_llm_engine(model, tokenizer, config, seed=0)
    prompt_tokens = 0
    for i, request in enumerate(requests):
        ids = tokenizer.encode(request.prompt)
        prompt_tokens += len(ids)
        params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{i}", ids, params)
    steps, t0 = 0, time.perf_counter()
    first_token_s: dict[str, float] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            if out.new_token_ids:
                first_token_s.setdefault(out.request_id, now)
        steps += 1
    seconds = time.perf_counter() - t0
    # Every request is added at once, so time to first token counts from the start. The
    # served burst's client starts max_num_seqs at once and the rest as those finish: the
    # first ones' last first token is what its TTFT p99 measures.
    first = [1e3 * first_token_s[f"r{i}"] for i in range(min(args.max_num_seqs, len(requests)))]
    output_tokens = sum(r.output_len for r in requests)
    return {
        "requests": len(requests),
        "steps": steps,
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_throughput": output_tokens / seconds,
        "total_token_throughput": (output_tokens + prompt_tokens) / seconds,
        "mean_step_ms": seconds / steps * 1e3,
        "first_requests_ttft_ms": {"p50": statistics.median(first), "max": max(first)},
        "kernel_backend": model.kernels.name,
        "compiled": "forward" in vars(model),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=TINY_LLAMA, help="a model directory")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--input-len", default="32-512", help="as bench/serving.py")
    p.add_argument("--output-len", default="16-256", help="as bench/serving.py")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="as palm-serve serve")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-prepack", action="store_true", help="plain nn.Linear")
    p.add_argument(
        "--kernel-backend", default="auto", help="as palm-serve serve: auto, torch, cpu, triton"
    )
    p.add_argument("--compile", action="store_true", help="the compiled step (model/compiled.py)")
    p.add_argument("--kv-cache-dtype", choices=["bfloat16", "float16"])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = replay(args)
    print(
        f"{report['requests']} requests, {report['steps']} steps in {report['seconds']:.1f} s: "
        f"{report['output_throughput']:.0f} output tok/s, "
        f"{report['total_token_throughput']:.0f} total tok/s, "
        f"mean step {report['mean_step_ms']:.1f} ms ({report['kernel_backend']} kernels, "
        f"{'compiled' if report['compiled'] else 'eager'}); the first {args.max_num_seqs} "
        f"requests' TTFT p50 {report['first_requests_ttft_ms']['p50']:.0f} ms, "
        f"max {report['first_requests_ttft_ms']['max']:.0f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
