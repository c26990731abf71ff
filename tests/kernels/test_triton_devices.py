"""The Triton wrappers refuse a tensor on another device than the rest, naming it, before
any launch: compiled, Triton only says "cpu tensor?" of a stray host tensor, and the
interpreter the CI runs accepts one silently (the first GPU run found a test helper that
built its attention metadata on the CPU). A meta tensor stands in for the other device, so
the checks run in this process, which does not interpret."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from palm_serve.kernels import build_cos_sin_cache, build_xpos_scale_cache

from triton_cases import make_paged_batch

OTHER = torch.device("meta")


def elsewhere(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device=OTHER)


@pytest.mark.parametrize(
    "field", ["k_cache", "v_cache", "block_tables", "query_start_loc", "context_lens"]
)
def test_paged_attention_names_the_stray_tensor(field: str) -> None:
    from palm_serve.kernels.triton import paged_attention

    batch = make_paged_batch(
        [1, 3], [5, 20], heads=4, kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32
    )
    k_cache, v_cache = batch.clean_caches()
    caches = {"k_cache": k_cache, "v_cache": v_cache}
    if field in caches:
        caches[field] = elsewhere(caches[field])
    else:
        batch = dataclasses.replace(batch, **{field: elsewhere(getattr(batch, field))})
    with pytest.raises(ValueError, match=f"^{field} is on meta but q on cpu"):
        paged_attention(*batch.args(caches["k_cache"], caches["v_cache"]))


@pytest.mark.parametrize("field", ["v", "k_cache", "v_cache", "slot_mapping"])
def test_write_kv_cache_names_the_stray_tensor(field: str) -> None:
    from palm_serve.kernels.triton import write_kv_cache

    args = {
        "k": torch.randn(3, 2, 16),
        "v": torch.randn(3, 2, 16),
        "k_cache": torch.zeros(4, 8, 2, 16),
        "v_cache": torch.zeros(4, 8, 2, 16),
        "slot_mapping": torch.tensor([0, 9, -1]),
    }
    args[field] = elsewhere(args[field])
    with pytest.raises(ValueError, match=f"^{field} is on meta but k on cpu"):
        write_kv_cache(**args)


@pytest.mark.parametrize("field", ["k", "positions", "cos_sin_cache", "xpos_scale_cache"])
def test_rotary_names_the_stray_tensor(field: str) -> None:
    from palm_serve.kernels.triton import rotary_embedding

    args = {
        "q": torch.randn(3, 4, 16),
        "k": torch.randn(3, 2, 16),
        "positions": torch.tensor([0, 1, 7]),
        "cos_sin_cache": build_cos_sin_cache(16, 32),
        "xpos_scale_cache": build_xpos_scale_cache(16, 32, 512.0),
    }
    args[field] = elsewhere(args[field])
    with pytest.raises(ValueError, match=f"^{field} is on meta but q on cpu"):
        rotary_embedding(*args.values())


@pytest.mark.parametrize("field", ["weight", "scales"])
def test_int8_linear_names_the_stray_tensor(field: str) -> None:
    from palm_serve.kernels.triton.int8_linear import int8_linear

    args = {
        "x": torch.randn(2, 8, dtype=torch.float16),
        "weight": torch.ones(4, 8, dtype=torch.int8),
        "scales": torch.ones(4),
    }
    args[field] = elsewhere(args[field])
    with pytest.raises(ValueError, match=f"^{field} is on meta but x on cpu"):
        int8_linear(args["x"], args["weight"], args["scales"], 4)
