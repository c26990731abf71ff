"""The greedy oracle is only as strong as the test model's dependence on its context."""

from __future__ import annotations

import torch

import engine_helpers
from engine_helpers import make_context_model

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread


def test_context_model_depends_on_the_context_and_separates_logits() -> None:
    model = make_context_model()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (64, 100), generator=gen)
    other = tokens.clone()
    other[:, :-1] = torch.randint(0, 97, (64, 99), generator=gen)  # same last token
    with torch.inference_mode():
        a = model.forward_dense(tokens)[:, -1]
        b = model.forward_dense(other)[:, -1]
    changed = (a.argmax(-1) != b.argmax(-1)).float().mean().item()
    assert changed > 0.5, f"only {changed:.0%} of greedy choices depend on the context"
    top2 = a.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # ties are rare at the 1e-4 tolerance
