"""Self-attention as both model families run it: over the paged cache through the kernel
backend (serving), and dense causal over [B, N] (the no-cache oracle and training).
The blocks differ around attention (PaLM's parallel block, Llama's sequential one), not in
it, so this is the one place the attention call sequence is written."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import KernelBackend
from ..kernels.rotary import rotate
from .attention_metadata import AttentionMetadata
from .kv_cache import KVCache


@dataclass
class RotaryTables:
    """The fp32 tables the model owns (see kernels.rotary): cos|sin [P, D], and the xPos
    factor [P, D/2] for q (k takes its inverse), or None without xPos."""

    cos_sin: torch.Tensor
    xpos_scale: torch.Tensor | None = None


class PagedSelfAttention:
    """One step's self-attention over the paged cache, called once per layer. What is the
    same for every layer (the kernels' plan of the batch) is prepared once, here."""

    def __init__(
        self,
        kernels: KernelBackend,
        positions: torch.Tensor,
        rotary: RotaryTables,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> None:
        self.kernels, self.positions, self.rotary = kernels, positions, rotary
        self.kv_cache, self.meta, self.scale = kv_cache, meta, scale
        self.plan = kernels.plan_paged_attention(
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            kv_cache.block_size,
            kv_cache.k[0].shape[2],
        )

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] of this step's tokens -> [T, H, D].

        Rotates q and k, writes k and v into the layer's cache, then attends over it."""
        q, k = q.contiguous(), k.contiguous()
        rotary, meta = self.rotary, self.meta
        self.kernels.rotary_embedding(q, k, self.positions, rotary.cos_sin, rotary.xpos_scale)
        k_cache, v_cache = self.kv_cache.k[layer], self.kv_cache.v[layer]
        self.kernels.write_kv_cache(k, v.contiguous(), k_cache, v_cache, meta.slot_mapping)
        return self.kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            self.scale,
            plan=self.plan,
        )


class DenseRotary:
    """Rotary factors for positions 0..n-1, broadcastable over [B, N, heads, D/2]."""

    def __init__(self, rotary: RotaryTables, n: int, max_positions: int) -> None:
        if n > max_positions:
            raise ValueError(f"sequence of {n} tokens exceeds max_positions {max_positions}")
        half = rotary.cos_sin.shape[-1] // 2
        cos_sin = rotary.cos_sin[:n].float()
        self.cos, self.sin = cos_sin[:, None, :half], cos_sin[:, None, half:]  # (N, 1, D/2)
        self.q_scale = self.k_scale = None
        if rotary.xpos_scale is not None:
            self.q_scale = rotary.xpos_scale[:n, None, :]
            self.k_scale = 1.0 / self.q_scale


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: DenseRotary, scale: float
) -> torch.Tensor:
    """q [B, N, H, D], k and v [B, N, Hkv, D] at positions 0..N-1 -> [B, N, H, D]."""
    group = q.shape[2] // k.shape[2]
    q = rotate(q, rope.cos, rope.sin, rope.q_scale).transpose(1, 2)  # (B, H, N, D)
    k = rotate(k, rope.cos, rope.sin, rope.k_scale).transpose(1, 2).repeat_interleave(group, 1)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # (B, H, N, D)
    return out.transpose(1, 2)
