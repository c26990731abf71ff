"""On a CUDA machine: serve a model through `palm-serve serve` on the GPU with the Triton
kernels and on the CPU path, send both the same greedy prompts, and compare the outputs.

For each model, three servers one after the other: the CPU path (fp32, the compiled CPU
kernels: the reference), the GPU in fp32 (Triton with IEEE fp32 dots: expected to agree
token for token but for near-ties) and the GPU in bf16 (expected to agree for a trained
model and to drift on a random one, whose logits nearly tie everywhere). Prints, per
server, how many prompts match the CPU's output exactly and the mean length of the common
prefix; exits non-zero when the trained default model's GPU fp32 outputs match on fewer
than --min-fp32-match of the prompts or its bf16 ones on fewer than --min-bf16-match.
Run by bench/gpu_check.sh.

    .venv/bin/python bench/gpu_serve_check.py [--models default,tiny-llama] [--prompts 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from peer_servers import REPO, VENVS, PalmServe, Running

LOGS = VENVS / "logs" / "gpu-serve-check"
MODELS = {
    "default": REPO / "model" / "default",
    "tiny-llama": REPO / "bench" / ".venvs" / "models" / "tiny-llama",
}
# (label, serve flags): the CPU reference first.
SERVERS = [
    ("cpu fp32", ["--device", "cpu", "--dtype", "float32"]),
    ("cuda fp32 triton", ["--device", "cuda", "--dtype", "float32", "--kernel-backend", "triton"]),
    ("cuda bf16 triton", ["--device", "cuda", "--dtype", "bfloat16", "--kernel-backend", "triton"]),
]
WORDS = "the of a model server token cache block query key value head layer river stone".split()


def prompts(n: int) -> list[str]:
    """Seeded word salads of 3 to 40 words: awkward, different lengths."""
    import random

    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def serve_and_ask(model: Path, flags: list[str], texts: list[str], port: int) -> list[list[int]]:
    """Start `palm-serve serve` as the peer benchmark does (its flags after the CPU fp32
    defaults, so they win), ask each text greedily, stop it."""
    name = "palm-serve-" + "-".join(flags[1::2])
    server = Running(PalmServe(name, tuple(flags)), model, port, 16, LOGS / f"{name}.log")
    try:
        server.wait_ready()
        outputs = []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for text in texts:
                body = {"prompt": text, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
                reply = client.post("/v1/generate", json=body)
                reply.raise_for_status()
                outputs.append(reply.json()["token_ids"])
        return outputs
    finally:
        server.stop()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,tiny-llama")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--port", type=int, default=18311)
    parser.add_argument("--min-fp32-match", type=float, default=0.9)
    parser.add_argument("--min-bf16-match", type=float, default=0.6)
    args = parser.parse_args()
    texts = prompts(args.prompts)
    failures = 0
    for name in args.models.split(","):
        model = MODELS[name]
        if not (model / "config.json").is_file():
            print(f"{name}: no model at {model} (bench/make_tiny_llama.py makes the tiny Llama)")
            failures += name == "default"
            continue
        reference: list[list[int]] | None = None
        for label, flags in SERVERS:
            started = time.monotonic()
            outputs = serve_and_ask(model, flags, texts, args.port)
            seconds = time.monotonic() - started
            if reference is None:
                reference = outputs
                print(f"{name:10s} {label:17s} reference ({seconds:.0f} s)")
                continue
            same = sum(a == b for a, b in zip(outputs, reference, strict=True)) / len(texts)
            prefix = sum(map(common_prefix, outputs, reference)) / len(texts)
            print(
                f"{name:10s} {label:17s} {same:5.0%} of prompts equal to the CPU's, "
                f"mean common prefix {prefix:.1f} of 24 tokens ({seconds:.0f} s)"
            )
            if name == "default":
                bound = args.min_fp32_match if "fp32" in label else args.min_bf16_match
                failures += same < bound
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
