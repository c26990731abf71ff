"""PaLMConfig: the model's shape, read from and written to config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

LayerNormStyle = Literal["gamma", "gamma_plus_one"]


@dataclass(frozen=True)
class PaLMConfig:
    vocab_size: int
    dim: int
    depth: int
    heads: int = 8
    dim_head: int = 64
    # Multi-query attention has one K/V head; kept as a field so grouped variants cost nothing.
    n_kv_heads: int = 1
    ff_mult: int = 4
    rotary_base: float = 10000.0
    # xPos rotary decay (palm-rlhf-pytorch); the scale base is its `rotary_xpos_scale_base`.
    use_xpos: bool = False
    xpos_scale_base: int = 512
    # "gamma": weight used as is (palm-pytorch); "gamma_plus_one": weight + 1 (palm-rlhf-pytorch).
    layernorm_style: LayerNormStyle = "gamma"
    layernorm_eps: float = 1e-5
    # l2-normalised q and k times learned per-dim scales (palm-rlhf-pytorch's qk_rmsnorm).
    qk_rmsnorm: bool = False
    max_positions: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "dim_head", "n_kv_heads", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"PaLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.n_kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embedding, got {self.dim_head}")
        if self.layernorm_style not in ("gamma", "gamma_plus_one"):
            raise ValueError(f"unknown layernorm_style {self.layernorm_style!r}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {self.max_positions}")

    @property
    def ff_inner(self) -> int:
        return self.dim * self.ff_mult

    @property
    def fused_dims(self) -> tuple[int, int, int, int]:
        """Output widths of the fused projection: q, k, v, ff (value half then gate half)."""
        kv = self.n_kv_heads * self.dim_head
        return (self.heads * self.dim_head, kv, kv, 2 * self.ff_inner)

    @property
    def attention_scale(self) -> float:
        # The references scale by dim_head ** -0.5 even with qk_rmsnorm (palm-rlhf-pytorch's
        # Attention ignores the block's qk_scale), so we do too.
        return self.dim_head**-0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PaLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"architecture", "model_type"})
        if unknown:
            raise ValueError(f"unknown PaLMConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        payload = {"architecture": "palm", **self.to_dict()}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PaLMConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
