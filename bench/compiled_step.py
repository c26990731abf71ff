"""The model's serving forward, eager against compiled (model/compiled.py), on the same
batches, interleaved call by call.

Both models are set up as the server sets them up (load_served_model: the kernel backend
auto picks, oneDNN-prepacked linears; one of them compiled). For each batch shape, the
eager and the compiled forward are called alternately --calls times on identical inputs
and KV caches of their own; the table gives the medians of the wall time and of the
process CPU time per call. On a machine shared with other work, CPU time with one thread
is the steadier measure of the work each does (it does not count time spent waiting for a
core); wall time with several threads also pays OpenMP's synchronisation.

    .venv/bin/python bench/compiled_step.py [--threads 1] [--calls 30] [--models palm,llama]
        [--graph]

The compiled step is the forward fused in C++ (model/fused_forward.py) where it serves;
--graph adds its torch.compile graph (--no-fused-step) as a third variant.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from palm_serve.engine.factory import load_served_model
from palm_serve.model import AttentionMetadata, KVCache
from palm_serve.model.fused_forward import FusedForward

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "palm": REPO / "model" / "default",
    "llama": REPO / "bench" / ".venvs" / "models" / "tiny-llama",
}
BLOCK_SIZE = 16
# name: (new tokens, context) per sequence
SHAPES = {
    "decode 32 x 32": [(1, 32)] * 32,
    "decode 32 x 384": [(1, 384)] * 32,
    "decode 1 x 32": [(1, 32)],
    "prefill 8 x 64": [(64, 64)] * 8,
    "mixed: chunk 256 + 31 decodes": [(256, 384)] + [(1, 200)] * 31,
}


def batch(
    shape: list[tuple[int, int]], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    tables, first = [], 0
    for _, context in shape:
        tables.append(list(range(first, first + -(-context // BLOCK_SIZE))))
        first += len(tables[-1])
    q_lens, contexts = [q for q, _ in shape], [c for _, c in shape]
    meta = AttentionMetadata.build(tables, q_lens, contexts, BLOCK_SIZE)
    positions = [p for q, c in shape for p in range(c - q, c)]
    ids = torch.randint(
        0, vocab_size, (len(positions),), generator=torch.Generator().manual_seed(0)
    )
    return ids, torch.tensor(positions), meta


def measure(models: dict, calls: int) -> dict[str, dict[str, tuple[float, float]]]:
    """shape -> variant -> (median wall s, median CPU s) per call."""
    config = models["eager"].config
    blocks = max(sum(-(-c // BLOCK_SIZE) for _, c in shape) for shape in SHAPES.values())
    caches = {v: KVCache.allocate(config, blocks, BLOCK_SIZE) for v in models}
    out = {}
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            ids, positions, meta = batch(shape, config.vocab_size)
            samples: dict[str, list[tuple[float, float]]] = {v: [] for v in models}
            for i in range(calls + 2):
                for variant, model in models.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    model(ids, positions, caches[variant], meta)
                    if i >= 2:  # two warm-up calls
                        samples[variant].append(
                            (time.perf_counter() - wall, time.process_time() - cpu)
                        )
            out[name] = {
                v: (statistics.median(s[0] for s in ss), statistics.median(s[1] for s in ss))
                for v, ss in samples.items()
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--models", default="palm,llama")
    p.add_argument(
        "--graph",
        action="store_true",
        help="the torch.compile graph too where the fused forward is the compiled step",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for key in args.models.split(","):
        path = MODELS[key]
        models = {
            "eager": load_served_model(path, prepack_cpu_linears=True),
            "compiled": load_served_model(path, prepack_cpu_linears=True, compile=True),
        }
        if args.graph and isinstance(models["compiled"].forward, FusedForward):
            models["graph"] = load_served_model(
                path, prepack_cpu_linears=True, compile=True, fused_step=False
            )
        kernels = models["eager"].kernels.name
        print(
            f"\n## {path.name}: {args.threads} threads, {kernels} kernels, medians of "
            f"{args.calls} interleaved calls; load average before "
            f"{open('/proc/loadavg').read().split()[0]}\n"
        )
        others = [v for v in models if v != "eager"]
        print(
            "| batch | eager wall ms | "
            + " | ".join(f"{v} wall ms | ratio" for v in others)
            + " | eager CPU ms | "
            + " | ".join(f"{v} CPU ms | ratio" for v in others)
            + " |"
        )
        print("|---" * (3 + 4 * len(others)) + "|")
        for name, r in measure(models, args.calls).items():
            ew, ec = r["eager"]
            walls = " | ".join(f"{r[v][0] * 1e3:.2f} | {r[v][0] / ew:.2f}x" for v in others)
            cpus = " | ".join(f"{r[v][1] * 1e3:.2f} | {r[v][1] / ec:.2f}x" for v in others)
            print(f"| {name} | {ew * 1e3:.2f} | {walls} | {ec * 1e3:.2f} | {cpus} |", flush=True)


if __name__ == "__main__":
    main()
