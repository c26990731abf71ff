"""On a CUDA device: the Triton int8 linear equals its torch twin on awkward shapes, fp16 and
bf16 (relative max error 1e-2 of max |y|, as the interpreted tests), and a quantized
model's logits through the Triton backend stay within the CPU path's bound of fp32.
Run by bench/gpu_check.sh; exits non-zero on a mismatch."""

from __future__ import annotations

import sys

import torch

from palm_serve.kernels import triton_backend
from palm_serve.kernels.int8_linear import int8_linear as twin
from palm_serve.model import PaLM, PaLMConfig
from palm_serve.model.quantization import quantize_linears

SHAPES = [(1, 7, 5), (1, 4096, 4096), (3, 129, 200), (17, 33, 1), (65, 96, 130), (300, 512, 2816)]


def main() -> int:
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for m, k, n in SHAPES:
            x = torch.randn(m, k, device="cuda").to(dtype)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
            s = torch.rand(n, device="cuda") * 0.02 + 1e-3
            y = triton_backend().int8_matmul.linear(x, w, s, n)
            ref = twin(x, w, s)
            rel = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ok = rel <= 1e-2 and not y.isnan().any()
            failures += not ok
            print(f"int8_linear {dtype} {m}x{k}x{n}: {rel:.2e} {'ok' if ok else 'FAIL'}")
    torch.manual_seed(0)
    config = PaLMConfig(vocab_size=97, dim=64, depth=2, heads=4, dim_head=16, max_positions=128)
    model = PaLM(config, triton_backend()).cuda().half().eval()
    torch.nn.init.normal_(model.token_emb.weight, std=1.0)
    tokens = torch.randint(0, 97, (2, 31), device="cuda")
    with torch.inference_mode():
        reference = model.forward_dense(tokens).double()
        quantize_linears(model, model.kernels.int8_matmul)
        actual = model.forward_dense(tokens).double()
    p, q = reference.log_softmax(-1), actual.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"PaLM fp16 through Triton, int8 vs fp16: mean KL {kl:.2e}")
    failures += kl > 4e-3
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
