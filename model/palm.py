"""The PaLM model (Chowdhery et al., arXiv:2204.02311): its parallel block and embedding.
The serving forward over the paged KV cache and the dense no-cache forward (the oracle in
tests, and the training path) are DecoderModel's.

Per layer, on x: h = LayerNorm(x); q, k, v, ff = fused_proj(h);
x + attn_out(attention(rotary(q), rotary(k), v)) + ff_out(silu(gate) * a)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KernelBackend, build_xpos_scale_cache
from .config import PaLMConfig
from .decoder import Attend, DecoderModel, Reduce, no_reduce


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
        self.reduce: Reduce = no_reduce
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

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [..., dim]: x + attn_out(attention) + ff_out(silu(gate) * a), ff's value half
        first and its gate second."""
        q, k, v, ff = self.project(x)
        attn = attend(q, k, v)  # (..., H, D)
        a, gate = ff.chunk(2, dim=-1)
        # one reduction for both branches: the parallel block's gift to tensor parallelism
        return x + self.reduce(self.attn_out(attn.flatten(-2)) + self.ff_out(F.silu(gate) * a))


class PaLM(DecoderModel):
    def __init__(self, config: PaLMConfig, kernels: KernelBackend | None = None) -> None:
        super().__init__(kernels)
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(ParallelBlock(config) for _ in range(config.depth))
        self.norm = LayerNorm(config.dim, config.layernorm_style, config.layernorm_eps)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        xpos = None
        if config.use_xpos:
            xpos = build_xpos_scale_cache(
                config.dim_head, config.max_positions, config.xpos_scale_base
            )
        self.init_rotary(config.rotary_base, xpos)

    @property
    def embedding(self) -> nn.Embedding:
        return self.token_emb
