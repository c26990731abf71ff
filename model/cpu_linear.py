"""Linear layers with their weights packed once for the CPU (fp32): in panels for our C++
kernel where it runs (a CPU with AVX2 or AVX-512), else in oneDNN's blocked layout.

torch's F.linear hands MKL the plain [out, in] weight, and MKL repacks it on every call:
for the small batches of decoding that copy costs as much as the multiply (the logits of
a 32000-word vocabulary at batch 16: 17 ms with F.linear, 7 ms prepacked). vLLM's CPU
backend prepacks for the same reason. At those batch sizes a linear streams its weight from
memory for a few rows; our panel kernel (kernels/cpu/panel_linear.cpp) does that faster
than oneDNN where it can run (docs/BENCHMARKS.md), and is level with it at prefill sizes, so
it replaces oneDNN there rather than sit beside it: one packed copy of each weight either
way. oneDNN's ops are torch's own (inductor uses them when it freezes CPU models) but
private, so everything falls back to nn.Linear without them.

Under torch.compile both are opaque ops of our library, torch.ops.palm_cpu.panel_linear and
torch.ops.palm_cpu.prepacked_linear (C++, kernels/cpu/; the compiled step runs only with
those kernels built): inductor cannot lower mkldnn._linear_pointwise on a weight that is a
graph input (its lowering wants a frozen constant), and letting it freeze and prepack the
weights itself measured no faster while it bypasses inductor's cache on every start
(docs/BENCHMARKS.md)."""

from __future__ import annotations

import torch
from torch import nn

from .decoder import DecoderModel

# oneDNN picks its blocking for this batch size; other sizes still work (measured faster
# than F.linear from 1 to 512 rows).
BATCH_HINT = 16


def prepacking_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def panels_available() -> bool:
    """Whether the panel kernel runs here: our compiled CPU kernels built with AVX2, on a
    CPU with AVX2 or AVX-512 that torch may use (ATEN_CPU_CAPABILITY caps torch as
    ONEDNN_MAX_CPU_ISA caps oneDNN; a cap below AVX2 keeps oneDNN's linear)."""
    from ..kernels import cpu

    return (
        cpu.available()
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        and bool(torch.ops.palm_cpu.panel_linear_supported())
    )


class PrepackedLinear(nn.Module):
    """y = x @ weight.T with the weight packed once: in panels of 16 output channels for
    the panel kernel (panels=True), else in oneDNN's layout. Inference only (no autograd)."""

    def __init__(self, weight: torch.Tensor, panels: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.panels = panels
        if panels:
            self.packed = torch.ops.palm_cpu.pack_panels(weight.detach())
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.panels:
            y = torch.ops.palm_cpu.panel_linear(flat, self.packed, self.out_features)
        elif torch.compiler.is_compiling():  # an opaque op in the graph (see the module doc)
            y = torch.ops.palm_cpu.prepacked_linear(flat, self.packed, self.out_features)
        else:  # eager: oneDNN's op itself
            y = _linear(flat, self.packed)
        return y.view(*x.shape[:-1], self.out_features)


def prepack_linears(model: DecoderModel) -> int:
    """Swap every bias-free fp32 CPU nn.Linear of the model (an untied logits head too) for
    a PrepackedLinear, and give a tied model a prepacked logits head over its embedding: in
    panels where the model runs our compiled CPU kernels and panels_available(), else in
    oneDNN's layout. Returns how many were swapped: 0 where neither applies."""
    panels = model.kernels.name == "cpu" and panels_available()
    if not (panels or prepacking_available()):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and _packable(child):
                setattr(parent, name, PrepackedLinear(child.weight, panels))
                swapped += 1
    tied = model.embedding.weight
    if model.logits_head is None and tied.device.type == "cpu" and tied.dtype == torch.float32:
        model.logits_head = PrepackedLinear(tied, panels)
        swapped += 1
    return swapped


def _packable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.bias is None
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    )
