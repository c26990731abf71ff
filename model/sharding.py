"""Tensor-parallel shards of a model (Megatron-LM's split, Shoeybi et al., arXiv:1909.08053),
cut at load time from the full weights. Rank r of N keeps:

- its query heads, and the K/V heads they read: split when there are at least N K/V heads
  (grouped-query attention), replicated when fewer (PaLM's single multi-query head: every
  rank keeps, and caches, all of it);
- its columns of the feed-forward's first projection (PaLM: value and gate halves cut at
  the same columns; Llama: gate and up);
- the matching rows (input features) of the output projections, so each rank's branch
  output is a partial sum that the block's `reduce` hook all-reduces: once per PaLM layer
  (its parallel block sums attn_out and ff_out first), twice per Llama layer;
- its slice of the vocabulary for the logits head (gathered before sampling).
The embedding stays replicated: a lookup is a copy, not a multiply, and splitting it would
add an all-reduce per step to save vocab x dim per rank.

Heads and columns are split as evenly as they go (sizes differ by at most one), so 3 query
heads over 2 ranks is 2 + 1. The shard is a model of the same class, built from a config
with the local sizes, so its forward is the model's own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .config import PaLMConfig
from .decoder import DecoderModel, Reduce
from .llama import Llama, LlamaBlock
from .llama_config import LlamaConfig
from .palm import PaLM, ParallelBlock


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds, as index ranges into the full model's dims."""

    rank: int
    world: int
    heads: range  # query heads
    kv_heads: range
    ff: range  # feed-forward inner columns
    vocab: range  # logits rows


@dataclass(frozen=True)
class PaLMShardConfig(PaLMConfig):
    """A PaLMConfig whose feed-forward width is the shard's (the full one is dim * ff_mult)."""

    shard_ff_inner: int = 0

    @property
    def ff_inner(self) -> int:
        return self.shard_ff_inner


def split_range(whole: range, parts: int, index: int) -> range:
    """Part `index` of `whole` cut into `parts` contiguous pieces, the first ones larger."""
    base, extra = divmod(len(whole), parts)
    start = whole.start + index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def plan_shard(config: PaLMConfig | LlamaConfig, rank: int, world: int) -> ShardPlan:
    """ValueError, naming the sizes, where the model cannot be split over `world` ranks."""
    heads, kv = config.heads, config.n_kv_heads
    if kv >= world:
        if kv % world:
            raise ValueError(
                f"n_kv_heads ({kv}) must be a multiple of the tensor-parallel size ({world}) "
                "or smaller than it"
            )
        kv_heads = split_range(range(kv), world, rank)
        group = heads // kv
        q_heads = range(kv_heads.start * group, kv_heads.stop * group)
    else:
        if world % kv:
            raise ValueError(
                f"the tensor-parallel size ({world}) must be a multiple of n_kv_heads ({kv})"
            )
        sharing = world // kv  # ranks that share (replicate) one K/V head
        group, kv_head = heads // kv, rank // sharing
        if group < sharing:
            raise ValueError(
                f"{heads} query heads cannot be split over {world} ranks "
                f"(each rank needs at least one)"
            )
        q_heads = split_range(
            range(kv_head * group, (kv_head + 1) * group), sharing, rank % sharing
        )
        kv_heads = range(kv_head, kv_head + 1)
    ff_inner = config.ff_inner if isinstance(config, LlamaConfig) else config.dim * config.ff_mult
    if ff_inner < world or config.vocab_size < world:
        raise ValueError(f"the model is too small to split over {world} ranks")
    ff = split_range(range(ff_inner), world, rank)
    vocab = split_range(range(config.vocab_size), world, rank)
    return ShardPlan(rank, world, q_heads, kv_heads, ff, vocab)


def shard_model(model: DecoderModel, rank: int, world: int) -> DecoderModel:
    """Rank `rank`'s shard of `model` (unprepacked, uncompiled), its logits head this
    rank's vocabulary slice; same dtype and device. Its blocks do not reduce until
    use_reduce gives them the group's all-reduce."""
    c = model.config
    if not isinstance(c, PaLMConfig | LlamaConfig):
        raise TypeError(f"no tensor-parallel split for {type(model).__name__}")
    plan = plan_shard(c, rank, world)
    shard: DecoderModel
    if isinstance(c, PaLMConfig):
        local = PaLMShardConfig(
            **{**c.to_dict(), "heads": len(plan.heads), "n_kv_heads": len(plan.kv_heads)},
            shard_ff_inner=len(plan.ff),
        )
        shard = PaLM(local, model.kernels)
    else:
        lc = dataclasses.replace(
            c, heads=len(plan.heads), n_kv_heads=len(plan.kv_heads), ff_inner=len(plan.ff)
        )
        shard = Llama(lc, model.kernels)
    shard.logits_head = None  # assigned below, after the state dict is loaded
    shard.load_state_dict(_shard_state(model, plan), assign=True)
    head = model.embedding.weight
    if model.logits_head is not None:  # an untied head (nn.Linear; never prepacked here)
        head = model.logits_head.weight  # type: ignore[assignment]
    shard.logits_head = _linear(head[plan.vocab.start : plan.vocab.stop])
    device = next(model.parameters()).device
    return shard.to(device).eval().requires_grad_(False)


def use_reduce(model: DecoderModel, reduce: Reduce) -> None:
    """Every block of the model sums its branches' partial outputs with `reduce`."""
    for layer in model.layers:
        layer.reduce = reduce  # type: ignore[assignment]


def _shard_state(model: DecoderModel, plan: ShardPlan) -> dict[str, torch.Tensor]:
    """The full state dict with each layer's split tensors cut to the plan (copies, so the
    full model can be freed)."""
    state = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith(("layers.", "logits_head."))
    }
    for i, layer in enumerate(model.layers):
        local = dict(layer.state_dict())
        if isinstance(layer, ParallelBlock):
            local.update(_palm_layer(layer, plan))
        elif isinstance(layer, LlamaBlock):
            local.update(_llama_layer(layer, plan))
        state.update({f"layers.{i}.{name}": t for name, t in local.items()})
    return state


def _rows(r: range, width: int, offset: int = 0) -> slice:
    """Rows of items r.start..r.stop of `width` rows each, after `offset` rows."""
    return slice(offset + r.start * width, offset + r.stop * width)


def _palm_layer(layer: ParallelBlock, plan: ShardPlan) -> dict[str, torch.Tensor]:
    c = layer.config
    d, ff = c.dim_head, c.dim * c.ff_mult
    q, kv = c.heads * d, c.n_kv_heads * d
    w = layer.fused_proj.weight  # (q | k | v | ff value | ff gate, dim)
    fused = torch.cat(
        [
            w[_rows(plan.heads, d)],
            w[_rows(plan.kv_heads, d, q)],
            w[_rows(plan.kv_heads, d, q + kv)],
            w[_rows(plan.ff, 1, q + 2 * kv)],
            w[_rows(plan.ff, 1, q + 2 * kv + ff)],
        ]
    )
    return {
        "fused_proj.weight": fused,
        "attn_out.weight": layer.attn_out.weight[:, _rows(plan.heads, d)].clone(),
        "ff_out.weight": layer.ff_out.weight[:, _rows(plan.ff, 1)].clone(),
    }


def _llama_layer(layer: LlamaBlock, plan: ShardPlan) -> dict[str, torch.Tensor]:
    c = layer.config
    d, ff = c.dim_head, c.ff_inner
    q, kv = c.heads * d, c.n_kv_heads * d
    qkv = layer.qkv_proj.weight  # (q | k | v, dim)
    gate_up = layer.gate_up_proj.weight  # (gate | up, dim)
    return {
        "qkv_proj.weight": torch.cat(
            [
                qkv[_rows(plan.heads, d)],
                qkv[_rows(plan.kv_heads, d, q)],
                qkv[_rows(plan.kv_heads, d, q + kv)],
            ]
        ),
        "o_proj.weight": layer.o_proj.weight[:, _rows(plan.heads, d)].clone(),
        "gate_up_proj.weight": torch.cat(
            [gate_up[_rows(plan.ff, 1)], gate_up[_rows(plan.ff, 1, ff)]]
        ),
        "down_proj.weight": layer.down_proj.weight[:, _rows(plan.ff, 1)].clone(),
    }


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding a copy of `weight` [out, in] (prepackable later)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear
