"""The paged KV cache: per layer, K and V of [num_blocks, block_size, n_kv_heads, dim_head]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_config import ModelConfig


@dataclass
class KVCache:
    k: list[torch.Tensor]  # one [NB, BS, Hkv, D] tensor per layer
    v: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V of every layer for one block."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.depth * block_size * config.n_kv_heads * config.dim_head * element

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (num_blocks, block_size, config.n_kv_heads, config.dim_head)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.depth)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.depth)],
        )
