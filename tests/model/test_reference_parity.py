"""Our PaLM, fed the reference implementations' state dicts, gives their logits."""

from __future__ import annotations

import pytest
import torch

from palm_serve.model import AttentionMetadata, KVCache, PaLM
from palm_serve.model.convert import convert_module

from reference import palm_pytorch_class, palm_rlhf_class

TOLERANCE = 1e-4


def _ours(ref: torch.nn.Module, layout: str, **overrides) -> PaLM:
    config, state = convert_module(ref, layout, **overrides)
    model = PaLM(config)
    model.load_state_dict(state)
    return model.eval()


def _paged_logits(model: PaLM, tokens: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """One prefill of each row through the paged path, all rows in one flattened batch."""
    batch, n = tokens.shape
    blocks_per_seq = -(-n // block_size)
    cache = KVCache.allocate(model.config, batch * blocks_per_seq, block_size)
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    meta = AttentionMetadata.build(tables, [n] * batch, [n] * batch, block_size)
    positions = torch.arange(n).repeat(batch)
    hidden = model(tokens.flatten(), positions, cache, meta)
    return model.compute_logits(hidden).view(batch, n, -1)


@pytest.mark.parametrize(
    "shape",
    [
        dict(num_tokens=101, dim=48, depth=1, heads=3, dim_head=16, ff_mult=4),
        dict(num_tokens=257, dim=64, depth=3, heads=8, dim_head=8, ff_mult=2),
        dict(num_tokens=50, dim=32, depth=2, heads=1, dim_head=32, ff_mult=3),
    ],
)
@torch.no_grad()
def test_palm_pytorch_logits(shape: dict) -> None:
    torch.manual_seed(1)
    ref = palm_pytorch_class()(**shape).eval()
    for p in ref.parameters():  # away from init so the norms' gammas matter too
        p.add_(torch.randn_like(p) * 0.05)
    ours = _ours(ref, "palm-pytorch", max_positions=128)
    tokens = torch.randint(0, shape["num_tokens"], (3, 37))  # 37: not a multiple of 16
    expected = ref(tokens)
    assert (ours.forward_dense(tokens) - expected).abs().max() < TOLERANCE
    assert (_paged_logits(ours, tokens) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("qk_rmsnorm", [False, True])
@torch.no_grad()
def test_palm_rlhf_logits_with_xpos(qk_rmsnorm: bool) -> None:
    torch.manual_seed(2)
    scale_base = 32  # sequences of 77 tokens run well past it
    ref = palm_rlhf_class()(
        num_tokens=83,
        dim=48,
        depth=2,
        heads=4,
        dim_head=16,
        qk_rmsnorm=qk_rmsnorm,
        rotary_xpos_scale_base=scale_base,
    ).eval()
    for p in ref.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    ours = _ours(ref, "palm-rlhf-pytorch", max_positions=256, xpos_scale_base=scale_base)
    assert ours.config.use_xpos and ours.config.qk_rmsnorm == qk_rmsnorm
    tokens = torch.randint(0, 83, (2, 77))
    expected = ref(tokens.clone())
    assert (ours.forward_dense(tokens) - expected).abs().max() < TOLERANCE
    assert (_paged_logits(ours, tokens) - expected).abs().max() < TOLERANCE
