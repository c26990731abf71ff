"""n-gram speculative decoding against plain decoding, through LLMEngine (no HTTP).

The workload is the default model's greedy continuations (repetitive: the model loops on
KJV phrases), prompts the first verses of model/default/heldout.txt, every request
`--output-len` tokens (ignore_eos, so both arms generate the same tokens; greedy outputs
are equal with and without speculation, which is checked). At each concurrency C,
max(C, --min-requests) requests are queued and at most C run at once (max_num_seqs). The
arms (plain; speculative, as configured by default; forced: speculation at any batch
size) are interleaved run by run: tok/s are medians of `--runs` runs, the ratios medians
of each run's paired ratio (arms back to back), so a load from other processes hits every
arm alike. Draft counts and acceptance exclude the warm-up.

    .venv/bin/python bench/speculative.py [--concurrency 1 32] [--runs 5]
        [--min-requests 4] [--output-len 128] [--threads 1] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine, load_served_model
from palm_serve.engine.llm_engine import LLMEngine
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.model import load_tokenizer
from palm_serve.server.settings import default_model_dir

ARMS = {
    "plain": {},
    "speculative": dict(speculative_ngram=True),
    # Speculation whatever the batch: where the default cut-off comes from.
    "forced": dict(speculative_ngram=True, speculative_max_running=10_000),
}


def prompts(model_dir: Path, tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: the heldout text's verses, one per prompt."""
    lines = (model_dir / "heldout.txt").read_text().splitlines()
    verses = [tokenizer.encode(line) for line in lines if line.strip()]
    long_enough = [ids[:length] for ids in verses if len(ids) >= length]
    return [long_enough[i % len(long_enough)] for i in range(count)]


def run_once(engine: LLMEngine, batch: list[list[int]], output_len: int) -> tuple[float, dict]:
    """Seconds to generate output_len tokens for every prompt of batch, all at once."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i, ids in enumerate(batch):
        engine.add_request(f"r{i}", ids, params)
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return time.perf_counter() - start, outputs


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_served_model(
        args.model, prepack_cpu_linears=True, compile=args.compile
    ).requires_grad_(False)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    report: dict = {"threads": args.threads, "output_len": args.output_len, "rows": []}
    for concurrency in args.concurrency:
        batch = prompts(args.model, tokenizer, max(concurrency, args.min_requests), args.prompt_len)
        config = dict(num_blocks=64 * concurrency + 64, max_num_seqs=concurrency)
        engines = {
            name: build_llm_engine(model, tokenizer, EngineConfig(**config, **extra))
            for name, extra in ARMS.items()
        }
        for engine in engines.values():  # warm-up (and the compiled graph's first shapes)
            run_once(engine, batch[:2], 8)
        before = {name: engine.stats() for name, engine in engines.items()}
        seconds: dict[str, list[float]] = {name: [] for name in ARMS}
        reference = None
        for _ in range(args.runs):
            for name, engine in engines.items():
                elapsed, outputs = run_once(engine, batch, args.output_len)
                seconds[name].append(elapsed)
                reference = reference or outputs
                assert outputs == reference, f"{name}: greedy outputs differ"
        tokens = len(batch) * args.output_len
        row = {"concurrency": concurrency}
        for name, engine in engines.items():
            after, start = engine.stats(), before[name]
            drafts = after.num_draft_tokens - start.num_draft_tokens
            accepted = after.num_accepted_draft_tokens - start.num_accepted_draft_tokens
            steps = after.num_steps - start.num_steps
            row[name] = {
                "tok_s": tokens / statistics.median(seconds[name]),
                "runs_s": seconds[name],
                "steps_per_run": steps / args.runs,
                "draft_tokens_per_run": drafts / args.runs,
                "acceptance_rate": accepted / drafts if drafts else 0.0,
            }
        for name in ("speculative", "forced"):
            # Each run's arms ran back to back: the median of the paired ratios is what a
            # load from other processes disturbs least.
            pairs = [p / s for p, s in zip(seconds["plain"], seconds[name], strict=True)]
            row[f"{name}_vs_plain"] = statistics.median(pairs)
        report["rows"].append(row)
        print(summary(row), flush=True)
    return report


def summary(row: dict) -> str:
    parts = [f"concurrency {row['concurrency']:>3}:"]
    for name in ARMS:
        arm = row[name]
        parts.append(f"{name} {arm['tok_s']:.0f} tok/s, {arm['steps_per_run']:.0f} steps")
        if name != "plain":
            parts[-1] += (
                f" ({row[name + '_vs_plain']:.2f}x paired, "
                f"{arm['draft_tokens_per_run']:.0f} drafts/run, "
                f"acceptance {arm['acceptance_rate']:.2f})"
            )
    return "  ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="the server's default on 2 CPUs")
    p.add_argument("--compile", action="store_true", help="the compiled step, as the server")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = measure(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
