"""Kernels of the PaLM forward: rotary embedding, KV-cache write, paged attention.

Each has a torch twin (the oracle, and the CPU path where no C++ compiler exists), a Triton
implementation with the same signature (the GPU path) and, for paged attention, a compiled
C++ one (kernels/cpu/, the CPU path); select_backend picks one set at start."""

from .backend import KernelBackend, cpu_backend, select_backend, torch_backend, triton_backend
from .kv_cache import write_kv_cache
from .paged_attention import PagedAttentionPlan, paged_attention, plan_paged_attention
from .rotary import build_cos_sin_cache, build_xpos_scale_cache, rotary_embedding

__all__ = [
    "KernelBackend",
    "PagedAttentionPlan",
    "build_cos_sin_cache",
    "build_xpos_scale_cache",
    "cpu_backend",
    "paged_attention",
    "plan_paged_attention",
    "rotary_embedding",
    "select_backend",
    "torch_backend",
    "triton_backend",
    "write_kv_cache",
]
