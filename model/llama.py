"""The Llama model (Touvron et al., arXiv:2302.13971): its sequential block, embedding and
untied head. A sibling of PaLM on DecoderModel, which owns the serving forward over the
paged KV cache and the dense no-cache forward, so the engine serves it unchanged.

Per layer, on x (sequential pre-norm):
  x = x + o_proj(attention(rotary(q), rotary(k), v)),  q, k, v = qkv_proj(RMSNorm(x))
  x = x + down_proj(silu(gate) * up),                  gate, up = gate_up_proj(RMSNorm(x))
The checkpoint's separate q/k/v and gate/up projections are fused at load time (one
matmul each instead of three and two: fewer calls per step on the CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import KernelBackend
from .decoder import Attend, DecoderModel, Reduce, no_reduce
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
        self.reduce: Reduce = no_reduce

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., dim] -> q [..., H, D], k and v [..., Hkv, D]."""
        c = self.config
        q, k, v = self.qkv_proj(self.input_layernorm(x)).split(c.qkv_dims, dim=-1)
        q = q.unflatten(-1, (c.heads, c.dim_head))
        k = k.unflatten(-1, (c.n_kv_heads, c.dim_head))
        v = v.unflatten(-1, (c.n_kv_heads, c.dim_head))
        return q, k, v

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [..., dim]: the attention residual, then the SwiGLU feed-forward residual."""
        attn = attend(*self.project(x))  # (..., H, D)
        x = x + self.reduce(self.o_proj(attn.flatten(-2)))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.reduce(self.down_proj(F.silu(gate) * up))


class Llama(DecoderModel):
    def __init__(self, config: LlamaConfig, kernels: KernelBackend | None = None) -> None:
        super().__init__(kernels)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.logits_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        # HF's rotary: inv_freq = 1 / theta^(2i/D), cos/sin of positions * inv_freq, rotate-half.
        self.init_rotary(config.rope_theta)

    @property
    def embedding(self) -> nn.Embedding:
        return self.embed_tokens
