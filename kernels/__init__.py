"""Kernels of the PaLM forward: rotary embedding, KV-cache write, paged attention.

Each has a torch twin (the CPU path and the oracle) and a Triton implementation with
the same signature (the GPU path); select_backend picks one set at start."""

from .backend import KernelBackend, select_backend, torch_backend, triton_backend
from .kv_cache import write_kv_cache
from .paged_attention import PagedAttentionPlan, paged_attention, plan_paged_attention
from .rotary import build_cos_sin_cache, build_xpos_scale_cache, rotary_embedding

__all__ = [
    "KernelBackend",
    "PagedAttentionPlan",
    "build_cos_sin_cache",
    "build_xpos_scale_cache",
    "paged_attention",
    "plan_paged_attention",
    "rotary_embedding",
    "select_backend",
    "torch_backend",
    "triton_backend",
    "write_kv_cache",
]
