"""Converters from the reference implementations' state dicts to our layout.

- palm-pytorch: `PaLM(...)` is an nn.Sequential: 0 = embedding, 1..depth = Residual
  blocks, depth+1 = LayerNorm, depth+2 = logits (tied to 0).
- palm-rlhf-pytorch: `PaLM` module with token_emb, layers.i.fn, norm, to_logits; xPos
  rotary, LayerNorm as gamma + 1, optional qk-RMSNorm scales."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from .checkpoint import CheckpointError
from .config import PaLMConfig
from .weights import check_state_dict

Layout = Literal["palm-pytorch", "palm-rlhf-pytorch"]
LAYOUTS: tuple[str, ...] = ("palm-pytorch", "palm-rlhf-pytorch")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pt file (a plain state dict, or one under 'state_dict'/'model')."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many types for a corrupt or truncated file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return obj


def _require(state: dict[str, torch.Tensor], name: str, source: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{source}: missing tensor {name!r}")
    return state[name]


def _layer_prefixes(state: dict[str, torch.Tensor], layout: Layout) -> list[str]:
    pattern = r"^(\d+)\.fn\." if layout == "palm-pytorch" else r"^layers\.(\d+)\.fn\."
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})
    if not indices:
        raise CheckpointError(f"no transformer blocks found: not a {layout} state dict")
    if layout == "palm-pytorch":
        return [f"{i}.fn." for i in indices]
    return [f"layers.{i}.fn." for i in indices]


def infer_config(state: dict[str, torch.Tensor], layout: Layout, **overrides: Any) -> PaLMConfig:
    """Shapes give vocab, dim, depth, heads, dim_head and ff_mult; the rest from overrides."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    source = layout
    prefixes = _layer_prefixes(state, layout)
    emb = _require(state, "0.weight" if layout == "palm-pytorch" else "token_emb.weight", source)
    vocab, dim = emb.shape
    ff_name = "ff_out.1.weight" if layout == "palm-pytorch" else "ff_out.2.weight"
    ff_inner = _require(state, prefixes[0] + ff_name, source).shape[1]
    dim_head = 2 * _require(state, prefixes[0] + "rotary_emb.inv_freq", source).shape[0]
    attn_inner = _require(state, prefixes[0] + "attn_out.weight", source).shape[1]
    values: dict[str, Any] = dict(
        vocab_size=vocab,
        dim=dim,
        depth=len(prefixes),
        heads=attn_inner // dim_head,
        dim_head=dim_head,
        ff_mult=ff_inner // dim,
    )
    if layout == "palm-rlhf-pytorch":
        values.update(
            use_xpos=True,
            layernorm_style="gamma_plus_one",
            qk_rmsnorm=(prefixes[0] + "q_scale") in state,
        )
    values.update(overrides)
    try:
        return PaLMConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build a config: {exc}") from None


def _name_map(config: PaLMConfig, layout: Layout) -> dict[str, str]:
    """Our tensor name -> the reference's."""
    if layout == "palm-pytorch":
        names = {"token_emb.weight": "0.weight", "norm.weight": f"{config.depth + 1}.gamma"}
        block = lambda i: f"{i + 1}.fn."  # noqa: E731
        ff_out = "ff_out.1.weight"
    else:
        names = {"token_emb.weight": "token_emb.weight", "norm.weight": "norm.gamma"}
        block = lambda i: f"layers.{i}.fn."  # noqa: E731
        ff_out = "ff_out.2.weight"
    for i in range(config.depth):
        ours, theirs = f"layers.{i}.", block(i)
        names[ours + "norm.weight"] = theirs + "norm.gamma"
        names[ours + "fused_proj.weight"] = theirs + "fused_attn_ff_proj.weight"
        names[ours + "attn_out.weight"] = theirs + "attn_out.weight"
        names[ours + "ff_out.weight"] = theirs + ff_out
        if config.qk_rmsnorm:
            names[ours + "q_scale"] = theirs + "q_scale"
            names[ours + "k_scale"] = theirs + "k_scale"
    return names


def convert_state_dict(
    state: dict[str, torch.Tensor],
    layout: Layout,
    config: PaLMConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> tuple[PaLMConfig, dict[str, torch.Tensor]]:
    """Map a reference state dict to ours; the result is checked name by name, shape by shape."""
    config = config or infer_config(state, layout, **overrides)
    names = _name_map(config, layout)
    items: Iterable = names.items()
    if progress:
        items = tqdm(items, total=len(names), desc="converting", unit="tensor")
    ours: dict[str, torch.Tensor] = {}
    for our_name, their_name in items:
        ours[our_name] = _require(state, their_name, layout).detach().clone().float()
    check_state_dict(ours, config, layout)
    return config, ours


def convert_module(
    module: torch.nn.Module, layout: Layout, **overrides: Any
) -> tuple[PaLMConfig, dict[str, torch.Tensor]]:
    """Convert an in-memory reference model."""
    return convert_state_dict(module.state_dict(), layout, **overrides)
