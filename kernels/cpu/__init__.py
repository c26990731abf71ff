"""Compiled CPU kernels (C++, OpenMP, AVX2), built on first use; the torch twins' signatures.

available() says whether they built here; where they did not (no C++ compiler, a failed
build), unavailable_reason() says why in one line and the backend keeps the twins."""

from .build import build_error, summary
from .paged_attention import paged_attention


def available() -> bool:
    return build_error() is None


def unavailable_reason() -> str | None:
    error = build_error()
    return None if error is None else summary(error)


__all__ = ["available", "build_error", "paged_attention", "unavailable_reason"]
