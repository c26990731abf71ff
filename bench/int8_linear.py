"""Which CPU kernel should run the int8 weight-only linears? Timed at the linear shapes of
the tiny Llama (bench/make_tiny_llama.py) and of the default PaLM (model/default/):

- fp32 prepacked: oneDNN's linear on the reordered fp32 weight (what fp32 serving runs);
- int8 ours: kernels/cpu/int8_linear.cpp (int8 panels widened in AVX2 registers, fp32
  accumulation), the kernel `--quantization int8` runs;
- int8pack fp32 / bf16: torch's aten._weight_int8pack_mm with fp32 activations, and with
  bf16 ones (the x -> bf16 and y -> fp32 conversions included, as a model in fp32 pays them).

Every variant runs once per round, round-robin, so load on the machine hits each alike;
medians of the rounds; each variant's max error relative to the fp32 product.

    .venv/bin/python bench/int8_linear.py [--threads 2] [--batches 1,8,32,256] [--rounds 9]
        [--threads 1 --clock cpu] [--models tiny-llama,palm-default]

To see the CPU without AVX-512 (the project's target), cap ATen's and oneDNN's instruction
sets (our kernel is built for AVX2 either way):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/int8_linear.py
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from clocks import CLOCKS, add_clock_argument, chosen_clock

from palm_serve.kernels import cpu
from palm_serve.model.quantization import quantize_int8

# (model, linear, in, out)
SHAPES = (
    ("tiny-llama", "qkv_proj", 512, 768),
    ("tiny-llama", "o_proj", 512, 512),
    ("tiny-llama", "gate_up_proj", 512, 2816),
    ("tiny-llama", "down_proj", 1408, 512),
    ("palm-default", "fused_proj", 256, 2368),
    ("palm-default", "attn_out", 256, 256),
    ("palm-default", "ff_out", 1024, 256),
)
BATCH_HINT = 16
clock = CLOCKS["wall"]  # --clock: chosen in main()


def variants(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    packed32 = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
    q, scales = quantize_int8(weight)
    ours = cpu.cpu_int8_matmul()
    panels, panel_scales = ours.pack(q, scales)
    n = weight.shape[0]
    bf16_scales = scales.to(torch.bfloat16)
    int8pack = torch.ops.aten._weight_int8pack_mm
    return {
        "fp32 prepacked": lambda x: torch.ops.mkldnn._linear_pointwise(
            x, packed32, None, "none", [], ""
        ),
        "int8 ours": lambda x: ours.linear(x, panels, panel_scales, n),
        "int8pack fp32": lambda x: int8pack(x, q, scales),
        "int8pack bf16": lambda x: int8pack(x.to(torch.bfloat16), q, bf16_scales).float(),
    }


def time_shape(k: int, n: int, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    """variant -> (median seconds per call, max error relative to the fp32 product)."""
    weight = torch.randn(n, k) / k**0.5
    ops = variants(weight)
    x = torch.randn(batch, k)
    reference = F.linear(x, weight)
    errors = {
        name: ((op(x) - reference).abs().max() / reference.abs().max()).item()
        for name, op in ops.items()
    }
    inner = max(1, int(1e8 / (2 * batch * k * n)))  # ~0.1 GFLOP per sample
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            t0 = clock()
            for _ in range(inner):
                op(x)
            samples[name].append((clock() - t0) / inner)
    return {name: (statistics.median(s), errors[name]) for name, s in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8,32,256")
    p.add_argument("--rounds", type=int, default=9)
    add_clock_argument(p)
    p.add_argument("--models", default="tiny-llama,palm-default")
    args = p.parse_args()
    global clock
    clock = chosen_clock(p, args)
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"the CPU kernels did not build: {cpu.unavailable_reason()}")
    print(f"torch {torch.__version__}, {args.threads} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; medians of {args.rounds} rounds, "
          f"{args.clock} time\n")  # fmt: skip
    for model in args.models.split(","):
        shapes = [(name, k, n) for m, name, k, n in SHAPES if m == model]
        print(f"## {model}: {', '.join(f'{name} {k}x{n}' for name, k, n in shapes)}\n")
        print("| batch | variant | " + " | ".join(s[0] for s in shapes) + " | sum ms | vs fp32 |")
        print("|---|---|" + "---|" * (len(shapes) + 2))
        for batch in map(int, args.batches.split(",")):
            rows = [time_shape(k, n, batch, args.rounds) for _, k, n in shapes]
            base = sum(r["fp32 prepacked"][0] for r in rows)
            for name in rows[0]:
                total = sum(r[name][0] for r in rows)
                cells = [f"{r[name][0] * 1e3:.3f} ({r[name][1]:.0e})" for r in rows]
                print(f"| {batch} | {name} | " + " | ".join(cells)
                      + f" | {total * 1e3:.3f} | {total / base:.2f}x |")  # fmt: skip
        print(flush=True)


if __name__ == "__main__":
    main()
