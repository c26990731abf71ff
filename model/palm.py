"""The PaLM forward (Chowdhery et al., arXiv:2204.02311) over a flattened batch and a
paged KV cache, plus a dense no-cache forward over [B, N] that shares every weight (the
oracle in tests, and the training path).

Per layer, on x: h = LayerNorm(x); q, k, v, ff = fused_proj(h);
x + attn_out(attention(rotary(q), rotary(k), v)) + ff_out(silu(gate) * a)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KernelBackend, build_cos_sin_cache, build_xpos_scale_cache, torch_backend
from .attention import DenseRotary, PagedSelfAttention, RotaryTables, dense_causal_attention
from .attention_metadata import AttentionMetadata
from .config import PaLMConfig
from .kv_cache import KVCache


class LayerNorm(nn.Module):
    """LayerNorm without bias; "gamma_plus_one" stores weight - 1 (palm-rlhf-pytorch)."""

    def __init__(self, dim: int, style: str, eps: float) -> None:
        super().__init__()
        self.plus_one = style == "gamma_plus_one"
        self.eps = eps
        init = torch.zeros(dim) if self.plus_one else torch.ones(dim)
        self.weight = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.plus_one else self.weight
        return F.layer_norm(x, x.shape[-1:], weight, None, self.eps)


class ParallelBlock(nn.Module):
    """Attention and feed-forward in parallel off one LayerNorm (GPT-J style)."""

    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = LayerNorm(config.dim, config.layernorm_style, config.layernorm_eps)
        self.fused_proj = nn.Linear(config.dim, sum(config.fused_dims), bias=False)
        self.attn_out = nn.Linear(config.heads * config.dim_head, config.dim, bias=False)
        self.ff_out = nn.Linear(config.ff_inner, config.dim, bias=False)
        if config.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(config.dim_head))
            self.k_scale = nn.Parameter(torch.ones(config.dim_head))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., dim] -> q [..., H, D], k and v [..., Hkv, D], ff [..., 2 * ff_inner]."""
        c = self.config
        q, k, v, ff = self.fused_proj(self.norm(x)).split(c.fused_dims, dim=-1)
        q = q.unflatten(-1, (c.heads, c.dim_head))
        k = k.unflatten(-1, (c.n_kv_heads, c.dim_head))
        v = v.unflatten(-1, (c.n_kv_heads, c.dim_head))
        if c.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        return q, k, v, ff

    def combine(self, x: torch.Tensor, attn: torch.Tensor, ff: torch.Tensor) -> torch.Tensor:
        """attn [..., H, D]; ff [..., 2 * ff_inner] with the value half first, gate second."""
        a, gate = ff.chunk(2, dim=-1)
        return x + (self.attn_out(attn.flatten(-2)) + self.ff_out(F.silu(gate) * a))


class PaLM(nn.Module):
    def __init__(self, config: PaLMConfig, kernels: KernelBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels or torch_backend()
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(ParallelBlock(config) for _ in range(config.depth))
        self.norm = LayerNorm(config.dim, config.layernorm_style, config.layernorm_eps)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        cos_sin = build_cos_sin_cache(config.dim_head, config.max_positions, config.rotary_base)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        xpos = None
        if config.use_xpos:
            xpos = build_xpos_scale_cache(
                config.dim_head, config.max_positions, config.xpos_scale_base
            )
        self.register_buffer("xpos_scale_cache", xpos, persistent=False)
        self.logits_head: nn.Module | None = None

    # ---- serving: flattened tokens over the paged cache -------------------------------

    @property
    def rotary_tables(self) -> RotaryTables:
        return RotaryTables(self.cos_sin_cache, self.xpos_scale_cache)

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
        x = self.token_emb(input_ids)  # (T, dim)
        for i, layer in enumerate(self.layers):
            q, k, v, ff = layer.project(x)
            attn = attend(i, q, k, v)
            x = layer.combine(x, attn, ff)
        return self.norm(x)

    def logits_weight(self) -> torch.Tensor:
        return self.token_emb.weight  # tied

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits tied to the token embedding: hidden [N, dim] -> [N, vocab]."""
        if self.logits_head is not None:  # the same weight, prepacked (model/cpu_linear.py)
            return self.logits_head(hidden)
        return F.linear(hidden, self.token_emb.weight)

    # ---- dense: [B, N] with no cache -----------------------------------------------------

    def forward_dense(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] -> logits [B, N, vocab], causal, positions 0..N-1."""
        c = self.config
        rope = DenseRotary(self.rotary_tables, tokens.shape[1], c.max_positions)
        x = self.token_emb(tokens)  # (B, N, dim)
        for layer in self.layers:
            q, k, v, ff = layer.project(x)  # q (B, N, H, D), k v (B, N, Hkv, D)
            attn = dense_causal_attention(q, k, v, rope, c.attention_scale)
            x = layer.combine(x, attn.to(x.dtype), ff)
        return self.compute_logits(self.norm(x))
