"""The Llama forward (Touvron et al., arXiv:2302.13971) over a flattened batch and a paged
KV cache, a sibling of PaLM sharing its kernels, AttentionMetadata and KVCache, so the
engine serves it unchanged; plus a dense no-cache forward (the oracle in tests).

Per layer, on x (sequential pre-norm):
  x = x + o_proj(attention(rotary(q), rotary(k), v)),  q, k, v = qkv_proj(RMSNorm(x))
  x = x + down_proj(silu(gate) * up),                  gate, up = gate_up_proj(RMSNorm(x))
The checkpoint's separate q/k/v and gate/up projections are fused at load time (one
matmul each instead of three and two: fewer calls per step on the CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KernelBackend, build_cos_sin_cache, torch_backend
from .attention import DenseRotary, PagedSelfAttention, RotaryTables, dense_causal_attention
from .attention_metadata import AttentionMetadata
from .kv_cache import KVCache
from .llama_config import LlamaConfig


class RMSNorm(nn.Module):
    """As transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.qkv_proj = nn.Linear(config.dim, sum(config.qkv_dims), bias=False)
        self.o_proj = nn.Linear(config.heads * config.dim_head, config.dim, bias=False)
        self.post_attention_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.gate_up_proj = nn.Linear(config.dim, 2 * config.ff_inner, bias=False)
        self.down_proj = nn.Linear(config.ff_inner, config.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., dim] -> q [..., H, D], k and v [..., Hkv, D]."""
        c = self.config
        q, k, v = self.qkv_proj(self.input_layernorm(x)).split(c.qkv_dims, dim=-1)
        q = q.unflatten(-1, (c.heads, c.dim_head))
        k = k.unflatten(-1, (c.n_kv_heads, c.dim_head))
        v = v.unflatten(-1, (c.n_kv_heads, c.dim_head))
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention residual, then the SwiGLU feed-forward residual; attn [..., H, D]."""
        x = x + self.o_proj(attn.flatten(-2))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, kernels: KernelBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels or torch_backend()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        # HF's rotary: inv_freq = 1 / theta^(2i/D), cos/sin of positions * inv_freq, rotate-half.
        self.logits_head: nn.Module | None = None
        cos_sin = build_cos_sin_cache(config.dim_head, config.max_positions, config.rope_theta)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    # ---- serving: flattened tokens over the paged cache -------------------------------

    @property
    def rotary_tables(self) -> RotaryTables:
        return RotaryTables(self.cos_sin_cache)

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
        x = self.embed_tokens(input_ids)  # (T, dim)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.project(x)
            attn = attend(i, q, k, v)
            x = layer.finish(x, attn)
        return self.norm(x)

    def logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, dim] -> [N, vocab] (untied head, or the embedding when tied)."""
        if self.logits_head is not None:  # the same weight, prepacked (model/cpu_linear.py)
            return self.logits_head(hidden)
        return F.linear(hidden, self.logits_weight())

    # ---- dense: [B, N] with no cache -----------------------------------------------------

    def forward_dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] -> logits [B, N, vocab], causal, positions 0..N-1."""
        c = self.config
        rope = DenseRotary(self.rotary_tables, tokens.shape[1], c.max_positions)
        x = self.embed_tokens(tokens)  # (B, N, dim)
        for layer in self.layers:
            q, k, v = layer.project(x)  # q (B, N, H, D), k v (B, N, Hkv, D)
            attn = dense_causal_attention(q, k, v, rope, c.attention_scale)
            x = layer.finish(x, attn.to(x.dtype))
        return self.compute_logits(self.norm(x))
