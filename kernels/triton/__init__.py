"""Triton implementations of the kernels (the GPU path), with the torch twins' signatures.

On the CPU they run only through Triton's interpreter (TRITON_INTERPRET=1, see launch.py)."""

from .int8_linear import triton_int8_matmul
from .kv_cache import write_kv_cache
from .paged_attention import paged_attention
from .rotary import rotary_embedding

__all__ = ["paged_attention", "rotary_embedding", "triton_int8_matmul", "write_kv_cache"]
