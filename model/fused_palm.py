"""The PaLM serving forward as one C++ call (torch.ops.palm_cpu.palm_forward,
kernels/cpu/palm_forward.cpp): every layer's norm, fused projection, rotary, KV-cache write,
attention, SiLU * gate, output linears and residual run in one OpenMP region, the threads
meeting at a barrier between phases, with no Python, dispatcher call or allocation between
the kernels. At decode batch sizes the default PaLM's linears take tens of microseconds, and
the compiled graph lost a quarter of its time to the serial work between them
(docs/BENCHMARKS.md), so where this forward serves, compile_model uses it instead of
torch.compile.

It serves a PaLM as the server sets it up on a CPU: the compiled CPU kernels, fp32 weights
packed in panels (model/cpu_linear.py), no qk RMSNorm, no tensor parallelism. The weights
are read as they are when fused (the norms' "gamma_plus_one" offset added then); the KV
cache may be fp32 or 16-bit."""

from __future__ import annotations

import torch
from torch import nn

from .attention_metadata import AttentionMetadata
from .config import PaLMConfig
from .cpu_linear import PrepackedLinear
from .decoder import DecoderModel, no_reduce
from .kv_cache import KVCache
from .palm import LayerNorm, PaLM, ParallelBlock


def unavailable_reason(model: DecoderModel) -> str | None:
    """None where FusedPaLMForward serves this model; else why not, in a few words."""
    if not isinstance(model, PaLM):
        return f"it is for PaLM models, not {type(model).__name__}"
    if model.kernels.name != "cpu":
        return f"it needs the compiled CPU kernels, not the {model.kernels.name} backend"
    weight = model.token_emb.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"it needs fp32 weights on the CPU, not {weight.dtype} on {weight.device}"
    if getattr(model.config, "qk_rmsnorm", False):
        return "it has no qk RMSNorm"
    for layer in model.layers:
        linears = (layer.fused_proj, layer.attn_out, layer.ff_out)
        if not all(isinstance(m, PrepackedLinear) and m.panels for m in linears):
            return "it needs the linears packed in panels (an AVX2 CPU, prepacked fp32 weights)"
        if layer.reduce is not no_reduce:
            return "it does not shard over tensor-parallel ranks"
    return None


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """The weight LayerNorm.forward hands F.layer_norm."""
    assert isinstance(norm, LayerNorm)
    weight = norm.weight.detach()
    return (weight + 1 if norm.plus_one else weight).contiguous()


def _panels(linear: nn.Module) -> torch.Tensor:
    assert isinstance(linear, PrepackedLinear) and linear.panels
    return linear.packed


class FusedPaLMForward:
    """Stands in for model.forward (same signature), through palm_cpu::palm_forward."""

    def __init__(self, model: DecoderModel) -> None:
        reason = unavailable_reason(model)
        if reason is not None:
            raise ValueError(f"the fused forward cannot serve this model: {reason}")
        assert isinstance(model, PaLM) and isinstance(model.config, PaLMConfig)
        c = model.config
        layers = [layer for layer in model.layers if isinstance(layer, ParallelBlock)]
        assert len(layers) == c.depth
        self._embedding = model.token_emb.weight.detach()
        self._norms = [_norm_weight(layer.norm) for layer in layers] + [_norm_weight(model.norm)]
        self._proj = [_panels(layer.fused_proj) for layer in layers]
        self._attn_out = [_panels(layer.attn_out) for layer in layers]
        self._ff_out = [_panels(layer.ff_out) for layer in layers]
        self._cos_sin = model.cos_sin_cache
        self._xpos = model.xpos_scale_cache
        self._sizes = (c.heads, c.n_kv_heads, c.ff_inner)
        self._scale, self._eps = c.attention_scale, c.layernorm_eps

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        heads, kv_heads, ff_inner = self._sizes
        hidden: torch.Tensor = torch.ops.palm_cpu.palm_forward(
            input_ids,
            positions,
            self._embedding,
            self._norms,
            self._proj,
            self._attn_out,
            self._ff_out,
            kv_cache.k,
            kv_cache.v,
            meta.slot_mapping,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            self._cos_sin,
            self._xpos,
            heads,
            kv_heads,
            ff_inner,
            self._scale,
            self._eps,
        )
        return hidden
