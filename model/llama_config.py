"""LlamaConfig: the shape of a Llama model, read from a Hugging Face config.json.

It exposes the same attribute names as PaLMConfig where the engine and the KV cache read
them (depth, n_kv_heads, dim_head, vocab_size, max_positions, eos/bos_token_id), so the
engine serves either model unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # hidden_size
    depth: int  # num_hidden_layers
    heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads (grouped-query attention)
    dim_head: int  # head_dim, else hidden_size / num_attention_heads
    ff_inner: int  # intermediate_size (SwiGLU width)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 2048  # max_position_embeddings
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "n_kv_heads", "dim_head", "ff_inner"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.n_kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embedding, got {self.dim_head}")

    @property
    def attention_scale(self) -> float:
        return self.dim_head**-0.5

    @property
    def qkv_dims(self) -> tuple[int, int, int]:
        """Output widths of the fused q/k/v projection."""
        kv = self.n_kv_heads * self.dim_head
        return (self.heads * self.dim_head, kv, kv)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """From a transformers LlamaConfig dict; features we do not implement are refused."""
        if data.get("model_type") != "llama":
            raise ValueError(f"model_type {data.get('model_type')!r} is not 'llama'")
        _refuse_unsupported(data)
        heads = data["num_attention_heads"]
        return cls(
            vocab_size=data["vocab_size"],
            dim=data["hidden_size"],
            depth=data["num_hidden_layers"],
            heads=heads,
            n_kv_heads=data.get("num_key_value_heads") or heads,
            dim_head=data.get("head_dim") or data["hidden_size"] // heads,
            ff_inner=data["intermediate_size"],
            rope_theta=float(_rope_theta(data)),
            rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            max_positions=data.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(data.get("bos_token_id")),
            eos_token_id=_first_id(data.get("eos_token_id")),
        )

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()))


def _rope_theta(data: dict[str, Any]) -> float:
    # transformers >= 5 nests it in rope_parameters; older configs have it at the top level.
    params = data.get("rope_parameters") or {}
    return params.get("rope_theta", data.get("rope_theta", 10000.0))


def _refuse_unsupported(data: dict[str, Any]) -> None:
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not supported (only plain rotary)")
    for flag in ("attention_bias", "mlp_bias"):
        if data.get(flag):
            raise ValueError(f"{flag}=true is not supported (the model has no biases)")
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {data['hidden_act']!r} is not supported (only silu)")


def _first_id(value: int | list[int] | None) -> int | None:
    """HF allows a list of EOS ids; the engine stops on one, so we take the first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
