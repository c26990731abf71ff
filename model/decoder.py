"""DecoderModel: what PaLM and Llama share. The serving forward over a flattened batch and
the paged cache, the logits head, and the dense no-cache forward (the oracle in tests) are
written once here; each model supplies only its block (how attention and feed-forward are
arranged around one attention call) and its embedding.

A block is called as block(x, attend) with attend(q [..., H, D], k and v [..., Hkv, D])
-> [..., H, D]: over the paged cache when serving, dense and causal otherwise."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KernelBackend, build_cos_sin_cache, torch_backend
from .attention import DenseRotary, PagedSelfAttention, RotaryTables, dense_causal_attention
from .attention_metadata import AttentionMetadata
from .kv_cache import KVCache
from .model_config import ModelConfig

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# What a block applies to its residual branches' partial sums before adding them to x:
# the identity, or tensor parallelism's all-reduce (model/sharding.py).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


class DecoderModel(nn.Module):
    """Subclasses build `layers` (blocks called as block(x, attend)), `norm` (the final
    norm) and the embedding that `embedding` returns, then call init_rotary."""

    config: ModelConfig
    layers: nn.ModuleList
    norm: nn.Module
    cos_sin_cache: torch.Tensor
    xpos_scale_cache: torch.Tensor | None

    def __init__(self, kernels: KernelBackend | None) -> None:
        super().__init__()
        self.kernels = kernels or torch_backend()
        # The logits weight in a module of its own: an untied head's nn.Linear, or None
        # when tied to the embedding; model/cpu_linear.py may swap in a prepacked twin.
        self.logits_head: nn.Module | None = None

    @property
    def embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def init_rotary(self, base: float, xpos_scale: torch.Tensor | None = None) -> None:
        """The fp32 rotary tables (and xPos factors), kept out of the state dict."""
        c = self.config
        cos_sin = build_cos_sin_cache(c.dim_head, c.max_positions, base)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self.register_buffer("xpos_scale_cache", xpos_scale, persistent=False)

    @property
    def rotary_tables(self) -> RotaryTables:
        return RotaryTables(self.cos_sin_cache, self.xpos_scale_cache)

    # ---- serving: flattened tokens over the paged cache -------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, dim].

        Writes this step's K/V to the cache at meta.slot_mapping, then attends."""
        attend = PagedSelfAttention(
            self.kernels, positions, self.rotary_tables, kv_cache, meta, self.config.attention_scale
        )
        x = self.embedding(input_ids)  # (T, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, partial(attend, i))
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, dim] -> logits [N, vocab]."""
        if self.logits_head is not None:
            return self.logits_head(hidden)
        return F.linear(hidden, self.embedding.weight)

    # ---- dense: [B, N] with no cache -----------------------------------------------------

    def forward_dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] -> logits [B, N, vocab], causal, positions 0..N-1."""
        c = self.config
        rope = DenseRotary(self.rotary_tables, tokens.shape[1], c.max_positions)
        x = self.embedding(tokens)  # (B, N, dim)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q (B, N, H, D), k v (B, N, Hkv, D)
            return dense_causal_attention(q, k, v, rope, c.attention_scale).to(x.dtype)

        for layer in self.layers:
            x = layer(x, attend)
        return self.compute_logits(self.norm(x))
