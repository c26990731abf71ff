"""Greedy decoding's choice: the index of each row's largest logit (the torch twin)."""

from __future__ import annotations

import torch


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [R, V] -> [R] int64: the first index of each row's maximum (of its first NaN)."""
    return x.argmax(dim=-1)
