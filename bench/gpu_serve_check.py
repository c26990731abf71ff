"""On a CUDA machine: serve a model through `palm-serve serve` on the GPU with the Triton
kernels and on the CPU path, send both the same prompts, and compare the outputs.

The prompts take turns over REQUEST_KINDS: greedy, and the sampler's other paths on the
device (seeded temperature, top-k, top-p with min-p, penalties, logprobs, a regex's token
bitmask). A seeded request draws its uniforms on the CPU whatever the device, so its tokens
match the CPU server's but where float rounding moves a draw across a token's boundary.
Only the greedy kinds gate the exit code; every request must succeed.

For each model, three servers one after the other: the CPU path (fp32, the compiled CPU
kernels: the reference), the GPU in fp32 (Triton with IEEE fp32 dots: expected to agree
token for token but for near-ties) and the GPU in bf16 (expected to agree for a trained
model and to drift on a random one, whose logits nearly tie everywhere). Prints, per
server and for the greedy and the sampled prompts apart, how many match the CPU's output
exactly and the mean length of the common prefix; exits non-zero when the trained default
model's GPU fp32 greedy outputs match on fewer than --min-fp32-match of the greedy prompts
or its bf16 ones on fewer than --min-bf16-match. Run by bench/gpu_check.sh.

    .venv/bin/python bench/gpu_serve_check.py [--models default,tiny-llama] [--prompts 48]
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
# Request fields by kind (prompt i takes kind i % len): the greedy kinds first.
REQUEST_KINDS: list[dict] = [
    {"temperature": 0.0},
    {"temperature": 0.0, "logprobs": 5},
    {"temperature": 0.8, "seed": 11},
    {"temperature": 1.0, "top_k": 20, "seed": 12},
    {"temperature": 1.0, "top_p": 0.9, "min_p": 0.05, "seed": 13},
    {"temperature": 0.7, "repetition_penalty": 1.2, "presence_penalty": 0.3, "seed": 14},
    {"temperature": 0.7, "frequency_penalty": 0.3, "logprobs": 2, "seed": 16},
    {"temperature": 0.9, "seed": 15, "structured_outputs": {"regex": "[a-z]+( [a-z]+){3,8}"}},
]
GREEDY_KINDS = 2


def prompts(n: int) -> list[str]:
    """Seeded word salads of 3 to 40 words: awkward, different lengths."""
    import random

    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def request_body(i: int, text: str) -> dict:
    """Prompt i's request: 24 tokens (fewer where a regex ends it) of REQUEST_KINDS[i % n]."""
    kind = REQUEST_KINDS[i % len(REQUEST_KINDS)]
    return {"prompt": text, "max_tokens": 24, "ignore_eos": True, **kind}


def is_greedy(i: int) -> bool:
    return i % len(REQUEST_KINDS) < GREEDY_KINDS


def serve_and_ask(model: Path, flags: list[str], texts: list[str], port: int) -> list[list[int]]:
    """Start `palm-serve serve` as the peer benchmark does (its flags after the CPU fp32
    defaults, so they win), ask each text as request_body says, stop it."""
    name = "palm-serve-" + "-".join(flags[1::2])
    server = Running(PalmServe(name, tuple(flags)), model, port, 16, LOGS / f"{name}.log")
    try:
        server.wait_ready()
        outputs = []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i, text in enumerate(texts):
                reply = client.post("/v1/generate", json=request_body(i, text))
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
    parser.add_argument("--prompts", type=int, default=48)
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
            rates = {}
            for kinds, chosen in (("greedy", True), ("sampled", False)):
                pairs = [
                    (out, ref)
                    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True))
                    if is_greedy(i) == chosen
                ]
                rates[kinds] = sum(a == b for a, b in pairs) / len(pairs)
                prefix = sum(common_prefix(a, b) for a, b in pairs) / len(pairs)
                print(
                    f"{name:10s} {label:17s} {kinds:8s} {rates[kinds]:5.0%} of {len(pairs)} "
                    f"prompts equal to the CPU's, mean common prefix {prefix:.1f} tokens "
                    f"({seconds:.0f} s)"
                )
            same = rates["greedy"]
            if name == "default":
                bound = args.min_fp32_match if "fp32" in label else args.min_bf16_match
                failures += same < bound
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
