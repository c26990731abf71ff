"""Is reduced precision faster than fp32 for the model's linears on this CPU?

For each of the tiny Llama's linear shapes (and its logits head) and batch sizes, the median
time of y = x @ W.T at fp32 (F.linear, and oneDNN-prepacked as the server runs it), bf16
and fp16 (F.linear, weights and activations in that dtype; and oneDNN-prepacked bf16), and
int8 weights with fp32/bf16 activations (torch.ops.aten._weight_int8pack_mm, per-channel
scales). Interleaved round-robin, so machine noise hits every variant alike.

    .venv/bin/python bench/precision.py [--threads 2] [--batches 1,8,32,256] [--rounds 7]
        [--threads 1 --clock cpu]

To see the same on a CPU without AVX-512 (the bf16 and VNNI instructions included), cap
oneDNN's, ATen's and MKL's instruction sets:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python bench/precision.py
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from clocks import CLOCKS, add_clock_argument, chosen_clock

# The tiny Llama of bench/make_tiny_llama.py: (name, in, out).
SHAPES = (
    ("qkv_proj", 512, 768),
    ("o_proj", 512, 512),
    ("gate_up_proj", 512, 2816),
    ("down_proj", 1408, 512),
    ("logits", 512, 32000),
)
BATCH_HINT = 16
_said: list[bool] = []  # whether the missing bf16 prepacking was reported
clock = CLOCKS["wall"]  # --clock: chosen in main()


def variants(weight: torch.Tensor) -> dict[str, tuple[torch.dtype, Callable]]:
    """name -> (activation dtype, x -> y); each converts nothing per call."""
    out: dict[str, tuple[torch.dtype, Callable]] = {}
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
    out["fp32 F.linear"] = (torch.float32, lambda x, w=weight: F.linear(x, w))
    out["fp32 prepacked"] = (
        torch.float32,
        lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
    )
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        w = weight.to(dtype)
        out[f"{name} F.linear"] = (dtype, lambda x, w=w: F.linear(x, w))
    try:
        packed16 = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), BATCH_HINT)
        out["bf16 prepacked"] = (
            torch.bfloat16,
            lambda x, p=packed16: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
        )
    except RuntimeError as error:  # needs AVX-512 (bw, vl, dq) or AVX-NE-CONVERT
        if not _said:
            print(f"(bf16 prepacking unavailable: {str(error).splitlines()[0]})\n")
            _said.append(True)
    scales = weight.abs().amax(dim=1) / 127.0
    w8 = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        s = scales.to(dtype)
        out[f"int8 weights, {name} act"] = (
            dtype,
            lambda x, w=w8, s=s: torch.ops.aten._weight_int8pack_mm(x, w, s),
        )
    return out


def time_shape(k: int, n: int, batch: int, rounds: int) -> dict[str, float]:
    weight = torch.randn(n, k) / k**0.5
    ops = variants(weight)
    x = torch.randn(batch, k)
    inputs = {name: x.to(dtype) for name, (dtype, _) in ops.items()}
    reference = F.linear(x, weight)
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for name, (_, op) in ops.items():  # warm-up, and each variant's error against fp32
        y = op(inputs[name]).float()
        err = ((y - reference).abs().max() / reference.abs().max()).item()
        samples[name].append(err)
    inner = max(1, int(2e8 / (2 * batch * k * n)))  # ~0.2 GFLOP per sample
    for _ in range(rounds):
        for name, (_, op) in ops.items():
            t0 = clock()
            for _ in range(inner):
                op(inputs[name])
            samples[name].append((clock() - t0) / inner)
    return {name: statistics.median(s[1:]) for name, s in samples.items()} | {
        f"{name} err": s[0] for name, s in samples.items()
    }


def _isa_flags() -> list[str]:
    """The CPU's vector extensions that matter here, from /proc/cpuinfo."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                wanted = ("avx2", "f16c", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx")
                return [f for f in line.split()[2:] if f.startswith(wanted)]
    except OSError:
        pass
    return ["?"]


def _caps() -> str:
    names = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
    set_ = [f"{n}={os.environ[n]}" for n in names if n in os.environ]
    return ", ".join(set_) or "none (the CPU's own instruction sets)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8,32,256")
    p.add_argument("--rounds", type=int, default=7)
    add_clock_argument(p)
    args = p.parse_args()
    global clock
    clock = chosen_clock(p, args)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, ATen CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, CPU flags: {' '.join(_isa_flags())}; "
        f"caps: {_caps()}; medians of {args.rounds} rounds, {args.clock} time\n"
    )
    for batch in map(int, args.batches.split(",")):
        print(f"## batch {batch}: ms per call (max relative error against fp32)\n")
        rows = {name: time_shape(k, n, batch, args.rounds) for name, k, n in SHAPES}
        names = [c for c in next(iter(rows.values())) if not c.endswith(" err")]
        print("| variant | " + " | ".join(rows) + " | sum | vs fp32 prepacked |")
        print("|---|" + "---|" * (len(rows) + 2))
        base = sum(r["fp32 prepacked"] for r in rows.values())
        for name in names:
            total = sum(r[name] for r in rows.values())
            cells = [f"{r[name] * 1e3:.3f} ({r[name + ' err']:.0e})" for r in rows.values()]
            print(
                f"| {name} | " + " | ".join(cells) + f" | {total * 1e3:.2f} | {total / base:.2f}x |"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
