"""Compiled CPU kernels (C++, OpenMP, AVX2) with the torch twins' signatures: paged attention,
rotary embedding and the KV-cache write (also fused), the weight-only int8 linear and
the row argmax of greedy decoding,
built on first use.

available() says whether they built here; where they did not (no C++ compiler, a failed
build), unavailable_reason() says why in one line and the backend keeps the twins."""

from .argmax import argmax_rows
from .build import build_error, summary
from .int8_linear import cpu_int8_matmul
from .paged_attention import paged_attention
from .rotary_kv_cache import rotary_embedding, rotary_write_kv_cache, write_kv_cache


def available() -> bool:
    return build_error() is None


def unavailable_reason() -> str | None:
    error = build_error()
    return None if error is None else summary(error)


__all__ = [
    "argmax_rows",
    "available",
    "build_error",
    "cpu_int8_matmul",
    "paged_attention",
    "rotary_embedding",
    "rotary_write_kv_cache",
    "unavailable_reason",
    "write_kv_cache",
]
