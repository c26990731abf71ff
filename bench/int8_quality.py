"""What int8 weights cost in quality, for the default PaLM (trained) and the benchmark's
tiny Llama (random weights): each model in fp32 and with `--quantization int8`, as the
server loads them (compiled CPU kernels, eager step).

- perplexity of the default model over the whole held-out split (dense forward);
- mean and max KL(fp32 || int8) of the next-token distributions over held-out text;
- greedy outputs of 50 prompts (windows of held-out text), 32 tokens each, through the
  engine: how many diverge from fp32, and at which generated token.

    .venv/bin/python bench/int8_quality.py [--prompts 50] [--tokens 32]"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import palm_serve.model
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine, load_served_model
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.model import DecoderModel, load_tokenizer

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repository's training/
from training.corpus import read_documents  # noqa: E402
from training.perplexity import dense_nll, encode_documents, windows  # noqa: E402

DEFAULT = Path(palm_serve.model.__file__).parent / "default"
TINY_LLAMA = Path(__file__).resolve().parent / ".venvs" / "models" / "tiny-llama"
HELDOUT = DEFAULT / "heldout.txt"
PROMPT_LEN = 16
KL_TOKENS = 4096


def load(path: Path, quantization: str) -> DecoderModel:
    return load_served_model(
        path, kernel_backend="cpu", prepack_cpu_linears=True, quantization=quantization
    )


def kl_divergence(fp32: DecoderModel, int8: DecoderModel, ids: list[int]) -> tuple[float, float]:
    """Mean and max KL(fp32 || int8) per position over windows of 256 tokens."""
    kls = []
    with torch.inference_mode():
        for w in windows(ids[: KL_TOKENS + 1], 256):
            x = torch.tensor([w[:-1]])
            p, q = (m.forward_dense(x).double().log_softmax(-1) for m in (fp32, int8))
            kls.append((p.exp() * (p - q)).sum(-1).flatten())
    every = torch.cat(kls)
    return every.mean().item(), every.max().item()


def greedy(model: DecoderModel, path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    engine = build_llm_engine(model, tokenizer, EngineConfig(num_blocks=2048, max_num_seqs=64))
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def report(name: str, path: Path, args: argparse.Namespace) -> None:
    fp32, int8 = load(path, "none"), load(path, "int8")
    tokenizer = load_tokenizer(path, fp32.config.vocab_size)
    ids = encode_documents(tokenizer, read_documents(HELDOUT))
    print(f"## {name} ({len(ids)} held-out tokens)")
    if path == DEFAULT:
        with torch.inference_mode():
            a, b = dense_nll(fp32, ids, 256), dense_nll(int8, ids, 256)
        print(f"perplexity fp32 {math.exp(a):.4f}, int8 {math.exp(b):.4f} "
              f"({100 * (math.exp(b - a) - 1):+.3f}%)")  # fmt: skip
    mean_kl, max_kl = kl_divergence(fp32, int8, ids)
    print(f"KL(fp32 || int8) over {KL_TOKENS} tokens: mean {mean_kl:.3e}, max {max_kl:.3e}")
    step = max(1, (len(ids) - PROMPT_LEN) // args.prompts)
    prompts = [ids[i * step : i * step + PROMPT_LEN] for i in range(args.prompts)]
    a_out = greedy(fp32, path, prompts, args.tokens)
    b_out = greedy(int8, path, prompts, args.tokens)
    where = [first_divergence(x, y) for x, y in zip(a_out, b_out, strict=True)]
    diverged = sorted(i for i in where if i is not None)
    median = statistics.median(diverged) if diverged else None
    print(f"greedy, {args.prompts} prompts x {args.tokens} tokens: {len(diverged)} diverge; "
          f"first differing token (0-based) of each: {diverged} (median {median})\n")  # fmt: skip


def report_models(
    description: str, report: Callable[[str, Path, argparse.Namespace], None]
) -> None:
    """report(name, model directory, args) for the default PaLM and, where it has been made,
    the tiny Llama; args: --prompts and --tokens."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    report("default PaLM (model/default)", DEFAULT, args)
    if (TINY_LLAMA / "model.safetensors").is_file():
        report("tiny Llama (bench/.venvs/models/tiny-llama, random weights)", TINY_LLAMA, args)
    else:
        print("no tiny Llama: run bench/make_tiny_llama.py first")


def main() -> None:
    report_models(__doc__.splitlines()[0], report)


if __name__ == "__main__":
    main()
