"""The fp32 panel linear (kernels/cpu/panel_linear.cpp) against oneDNN's prepacked linear,
over every linear of a tiny-Llama step (8 layers: qkv 768x512, o 512x512, gate_up 2816x512,
down 512x1408, then the 32000x512 head), for M rows of activations each.

Each linear has its own weight, so the step streams ~155 MB of weights as the model's does
(no weight stays in the caches from one call to its next). The two sides alternate, --rounds
times each, and each cell is the median; GB/s is weight bytes over time. Errors are relative
to the largest output, against x @ w.T.

    .venv/bin/python bench/panel_linear.py [--threads 2] [--rows 1,8,16,32,64,256,2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from palm_serve.kernels.cpu import build
from palm_serve.model.cpu_linear import PrepackedLinear, panels_available

SHAPES = [(768, 512), (512, 512), (2816, 512), (512, 1408)] * 8 + [(32000, 512)]  # (N, K)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8,16,32,64,256,2048")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    build.load()
    if not panels_available():
        raise SystemExit("the panel linear does not run here (it needs AVX2 or AVX-512)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    panels = [PrepackedLinear(w, panels=True) for w in weights]
    onednn = [PrepackedLinear(w) for w in weights]
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"{len(SHAPES)} linears, {megabytes:.0f} MB of fp32 weights, {args.threads} threads, "
          f"medians of {args.rounds}")  # fmt: skip
    print("| rows | panels ms | GB/s | oneDNN ms | GB/s | panels / oneDNN | max error |")
    print("|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        with torch.inference_mode():
            error = max(
                ((lin(x) - x @ w.T).abs().max() / (x @ w.T).abs().max()).item()
                for lin, x, w in zip(panels, xs, weights, strict=True)
            )
            times: dict[str, list[float]] = {"panels": [], "onednn": []}
            for _ in range(args.rounds):
                for name, linears in (("panels", panels), ("onednn", onednn)):
                    start = time.perf_counter()
                    for lin, x in zip(linears, xs, strict=True):
                        lin(x)
                    times[name].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[k]) for k in ("panels", "onednn"))
        print(f"| {rows} | {ours * 1e3:.2f} | {megabytes / ours / 1e3:.1f} | {theirs * 1e3:.2f} | "
              f"{megabytes / theirs / 1e3:.1f} | {ours / theirs:.2f}x | {error:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
