"""What a 16-bit KV cache (`--kv-cache-dtype`) costs in quality, for the default PaLM
(trained) and the benchmark's tiny Llama (random weights): fp32 weights as the server loads
them (compiled CPU kernels, eager step), with the cache in fp32, bf16 and fp16.

- perplexity of the default model over the held-out split, through the engine's paged path
  (prompt logprobs of 256-token windows; the dense forward has no cache to round);
- greedy outputs of 50 prompts (windows of held-out text), 32 tokens each, through the
  engine: how many diverge from the fp32 cache's, and at which generated token.

    .venv/bin/python bench/kv_cache_quality.py [--prompts 50] [--tokens 32]"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from int8_quality import DEFAULT, HELDOUT, PROMPT_LEN, first_divergence, report_models

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine, load_served_model
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.model import DecoderModel, load_tokenizer

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repository's training/
from training.corpus import read_documents  # noqa: E402
from training.perplexity import encode_documents, windows  # noqa: E402

CACHE_DTYPES = ("float32", "bfloat16", "float16")
CONTEXT = 256


def engine_for(model: DecoderModel, path: Path, cache_dtype: str):
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    config = EngineConfig(num_blocks=2048, max_num_seqs=64, kv_cache_dtype=cache_dtype)
    return build_llm_engine(model, tokenizer, config)


def drain(engine) -> dict[str, list]:
    """Every output of every request, by request id, until the engine is idle."""
    outputs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append(o)
    return outputs


def paged_nll(model: DecoderModel, path: Path, cache_dtype: str, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] in windows of CONTEXT tokens, as the paged
    path scores them (the windows' prompt logprobs)."""
    engine = engine_for(model, path, cache_dtype)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    chunks = windows(ids, CONTEXT)
    for i, window in enumerate(chunks):
        engine.add_request(str(i), window, params)
    total, count = 0.0, 0
    for outs in drain(engine).values():
        entries = [e for o in outs for e in (o.prompt_logprobs or []) if e is not None]
        total -= sum(e.logprob for e in entries)
        count += len(entries)
    assert count == len(ids) - 1, (count, len(ids))
    return total / count


def greedy(model, path: Path, cache_dtype: str, prompts: list[list[int]], n: int) -> list:
    engine = engine_for(model, path, cache_dtype)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = drain(engine)
    return [[t for o in outputs[str(i)] for t in o.new_token_ids] for i in range(len(prompts))]


def report(name: str, path: Path, args: argparse.Namespace) -> None:
    model = load_served_model(path, kernel_backend="cpu", prepack_cpu_linears=True)
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    ids = encode_documents(tokenizer, read_documents(HELDOUT))
    print(f"## {name} ({len(ids)} held-out tokens)")
    with torch.inference_mode():
        if path == DEFAULT:
            nll = {c: paged_nll(model, path, c, ids) for c in CACHE_DTYPES}
            print(" ".join(
                f"perplexity, {c} cache: {math.exp(nll[c]):.4f} "
                f"({100 * (math.exp(nll[c] - nll['float32']) - 1):+.3f}%);"
                for c in CACHE_DTYPES
            ))  # fmt: skip
        step = max(1, (len(ids) - PROMPT_LEN) // args.prompts)
        prompts = [ids[i * step : i * step + PROMPT_LEN] for i in range(args.prompts)]
        outs = {c: greedy(model, path, c, prompts, args.tokens) for c in CACHE_DTYPES}
    for c in CACHE_DTYPES[1:]:
        where = [first_divergence(x, y) for x, y in zip(outs["float32"], outs[c], strict=True)]
        diverged = sorted(i for i in where if i is not None)
        median = statistics.median(diverged) if diverged else None
        print(f"greedy, {c} cache, {args.prompts} prompts x {args.tokens} tokens: "
              f"{len(diverged)} diverge from fp32's; first differing token (0-based) of each: "
              f"{diverged} (median {median})")  # fmt: skip
    print()


def main() -> None:
    report_models(__doc__.splitlines()[0], report)


if __name__ == "__main__":
    main()
