"""Weight-only int8 quantization (`--quantization int8`): every linear of the blocks keeps
its weight as int8 with one fp32 scale per output channel, symmetric (w ~ q * scale,
q in [-127, 127], scale = max |w| of the channel / 127), and multiplies through the kernel
backend's int8 linear (kernels/int8_linear.py), which widens the int8 weight in registers.

An untied logits head (the Llama's lm_head) is quantized the same way: at small batches it
is the step's largest read (docs/BENCHMARKS.md, "int8 weight-only", has its quality
figures). The embedding stays in the model's dtype, and so does a tied head, which is the
embedding: one table serves lookups and logits, and an int8 copy would add bytes."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from ..kernels.int8_linear import Int8Matmul
from .cpu_linear import PrepackedLinear
from .decoder import DecoderModel

logger = logging.getLogger(__name__)

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int8, scales [N] fp32), symmetric per output channel,
    rounded to nearest. An all-zero channel gets scale 1 (and zeros)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (q * scales[:, None]).T, the weight in the layout of the backend's kernel.
    Inference only; `weight` and `scales` are buffers (what a state dict of it holds)."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, matmul: Int8Matmul) -> None:
        """q [N, K] int8 and scales [N], as quantize_int8 makes them."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.matmul = matmul
        packed, packed_scales = matmul.pack(q, scales.float())
        self.register_buffer("weight", packed)
        self.register_buffer("scales", packed_scales)

    @classmethod
    def quantize(cls, weight: torch.Tensor, matmul: Int8Matmul) -> Int8Linear:
        q, scales = quantize_int8(weight)
        return cls(q, scales, matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.matmul.linear(flat, self.weight, self.scales, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.matmul.name}"


def quantize_linears(model: DecoderModel, matmul: Int8Matmul) -> int:
    """Swap every bias-free nn.Linear of the model's blocks, and an untied logits head, for
    an Int8Linear multiplying through `matmul`; returns how many were swapped. The
    embedding (and a tied head, which is the embedding) stays."""
    swapped = 0
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.bias is None:
                    setattr(parent, name, Int8Linear.quantize(child.weight, matmul))
                    swapped += 1
    head = model.logits_head
    if type(head) is nn.Linear and head.bias is None:
        model.logits_head = Int8Linear.quantize(head.weight, matmul)
        swapped += 1
    return swapped


# ---- int8 checkpoints (`palm-serve convert --quantization int8`) -------------------------
# A block linear's "<name>.weight" is stored as int8 [N, K] with "<name>.scales" [N] fp32
# beside it; every other tensor as the model's.

SCALES = "scales"


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PaLM state dict with its blocks' linear weights quantized (the names of
    block_linear_weights); the embedding and the norms unchanged."""
    out = dict(state)
    for name in block_linear_weights(state):
        q, scales = quantize_int8(state[name])
        out[name] = q
        out[name.removesuffix("weight") + SCALES] = scales
    return out


def block_linear_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """The 2-D "layers.*.weight" tensors: the blocks' linears (norms are 1-D)."""
    return [n for n, t in state.items() if n.startswith("layers.") and n.endswith(".weight")
            and t.dim() == 2]  # fmt: skip


def split_int8_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(the model's other tensors, module name -> (q, scales)) of a state dict that may
    hold int8 linears; raises ValueError for a scale without its int8 weight."""
    rest, int8 = dict(state), {}
    for name in [n for n in state if n.endswith("." + SCALES)]:
        module = name.removesuffix("." + SCALES)
        weight = rest.get(module + ".weight")
        if weight is None or weight.dtype != torch.int8:
            raise ValueError(f"{name}: scales of no int8 weight {module}.weight")
        int8[module] = (rest.pop(module + ".weight"), rest.pop(name))
    return rest, int8


def install_int8_linears(
    model: DecoderModel, int8: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Replace each named linear of the model by an Int8Linear of its (q, scales)."""
    for module, (q, scales) in int8.items():
        parent_name, _, attr = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if type(linear) is not nn.Linear or tuple(linear.weight.shape) != tuple(q.shape):
            raise ValueError(f"{module}: no linear of shape {tuple(q.shape)} in the model")
        if scales.shape != (q.shape[0],):
            raise ValueError(f"{module}.scales: shape {tuple(scales.shape)}, not [{q.shape[0]}]")
        setattr(parent, attr, Int8Linear(q, scales, model.kernels.int8_matmul))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held in memory: parameters, persistent buffers
    (int8 weights and their scales) and oneDNN-packed linears (not in the state dict).
    The rotary tables, computed at start and not weights, are left out."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for module in model.modules():
        if isinstance(module, PrepackedLinear):  # its packed fp32 copy of the weight
            total += module.out_features * module.in_features * 4
    return total


def linear_weight_bytes(model: DecoderModel) -> int:
    """Bytes of the linears int8 shrinks (the blocks' and an untied head; weights and
    scales)."""
    total = 0
    modules = [*model.layers.modules()]
    head = model.logits_head
    if head is not None and type(head) in (nn.Linear, Int8Linear):  # untied, not prepacked
        modules.append(head)
    for module in modules:
        if isinstance(module, Int8Linear):
            total += module.weight.nbytes + module.scales.nbytes
        elif type(module) is nn.Linear:
            total += module.weight.nbytes
    return total
