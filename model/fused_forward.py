"""The serving forward as one C++ call (torch.ops.palm_cpu.decoder_forward,
kernels/cpu/decoder_forward.cpp) for PaLM and Llama models: every block's norms,
projections, rotary, KV-cache write, attention, SiLU * gate, output linears and residuals
run in one OpenMP region, the threads meeting at a barrier between phases, with no Python,
dispatcher call or allocation between the kernels. At decode batch sizes the default PaLM's
linears take tens of microseconds, and the compiled graph lost a quarter of its time to the
serial work between them (docs/BENCHMARKS.md), so where this forward serves, compile_model
uses it instead of torch.compile.

It serves a model as the server sets it up on a CPU: the compiled CPU kernels, fp32
weights with the blocks' linears packed in panels (model/cpu_linear.py), no qk RMSNorm, no
tensor parallelism. The weights are read as they are when fused (PaLM's "gamma_plus_one"
norm offset added then); the KV cache may be fp32 or 16-bit."""

from __future__ import annotations

import torch
from torch import nn

from .attention_metadata import AttentionMetadata
from .config import PaLMConfig
from .cpu_linear import PrepackedLinear
from .decoder import DecoderModel, no_reduce
from .kv_cache import KVCache
from .llama import Llama, LlamaBlock, RMSNorm
from .llama_config import LlamaConfig
from .palm import LayerNorm, PaLM, ParallelBlock


def _blocks_linears(model: DecoderModel) -> list[list[nn.Module]]:
    """Per block, the linears the fused forward reads: PaLM's fused projection, attention
    and feed-forward outputs; Llama's qkv, output, gate | up and down projections."""
    if isinstance(model, PaLM):
        return [
            [b.fused_proj, b.attn_out, b.ff_out]
            for b in model.layers
            if isinstance(b, ParallelBlock)
        ]
    return [
        [b.qkv_proj, b.o_proj, b.gate_up_proj, b.down_proj]
        for b in model.layers
        if isinstance(b, LlamaBlock)
    ]


def unavailable_reason(model: DecoderModel) -> str | None:
    """None where FusedForward serves this model; else why not, in a few words."""
    if not isinstance(model, PaLM | Llama):
        return f"it is for PaLM and Llama models, not {type(model).__name__}"
    if model.kernels.name != "cpu":
        return f"it needs the compiled CPU kernels, not the {model.kernels.name} backend"
    weight = model.embedding.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return f"it needs fp32 weights on the CPU, not {weight.dtype} on {weight.device}"
    if getattr(model.config, "qk_rmsnorm", False):
        return "it has no qk RMSNorm"
    for block, linears in zip(model.layers, _blocks_linears(model), strict=True):
        if not all(isinstance(m, PrepackedLinear) and m.panels for m in linears):
            return "it needs the linears packed in panels (an AVX2 CPU, prepacked fp32 weights)"
        if block.reduce is not no_reduce:
            return "it does not shard over tensor-parallel ranks"
    return None


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """The weight the norm's forward applies."""
    assert isinstance(norm, LayerNorm | RMSNorm)
    weight = norm.weight.detach()
    plus_one = isinstance(norm, LayerNorm) and norm.plus_one
    return (weight + 1 if plus_one else weight).contiguous()


def _panels(linear: nn.Module) -> torch.Tensor:
    assert isinstance(linear, PrepackedLinear) and linear.panels
    return linear.packed


class FusedForward:
    """Stands in for model.forward (same signature), through palm_cpu::decoder_forward."""

    def __init__(self, model: DecoderModel) -> None:
        reason = unavailable_reason(model)
        if reason is not None:
            raise ValueError(f"the fused forward cannot serve this model: {reason}")
        linears = _blocks_linears(model)
        self._qkv = [_panels(b[0]) for b in linears]
        self._attn_out = [_panels(b[1]) for b in linears]
        self._ff_out = [_panels(b[-1]) for b in linears]
        self._ff_in = [_panels(b[2]) for b in linears if len(b) == 4]
        norms: list[nn.Module]
        if isinstance(model, PaLM):
            assert isinstance(model.config, PaLMConfig)
            self._block, eps = "parallel", model.config.layernorm_eps
            norms = [b.norm for b in model.layers if isinstance(b, ParallelBlock)]
        else:
            assert isinstance(model.config, LlamaConfig)
            self._block, eps = "sequential", model.config.rms_norm_eps
            norms = [
                n
                for b in model.layers
                if isinstance(b, LlamaBlock)
                for n in (b.input_layernorm, b.post_attention_layernorm)
            ]
        c = model.config
        self._embedding = model.embedding.weight.detach()
        self._norms = [_norm_weight(n) for n in (*norms, model.norm)]
        self._cos_sin = model.cos_sin_cache
        self._xpos = model.xpos_scale_cache
        self._sizes = (c.heads, c.n_kv_heads, c.ff_inner)
        self._scale, self._eps = c.attention_scale, eps

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        heads, kv_heads, ff_inner = self._sizes
        hidden: torch.Tensor = torch.ops.palm_cpu.decoder_forward(
            input_ids,
            positions,
            self._embedding,
            self._norms,
            self._qkv,
            self._attn_out,
            self._ff_in,
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
            self._block,
        )
        return hidden
