"""Run as a script: builds the CPU kernels without AVX2 (the scalar loops vec.h falls back
to where the CPU lacks it) and prints, as JSON, their largest differences from the twins
(attention: relative to the largest output, against the twin in fp64). A process of its
own, since both builds register the same torch.ops.palm_cpu names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from palm_serve.kernels import build_cos_sin_cache, build_xpos_scale_cache  # noqa: E402
from palm_serve.kernels import paged_attention as twin_paged_attention  # noqa: E402
from palm_serve.kernels.cpu import build  # noqa: E402

from triton_cases import make_paged_batch, rotate_fused  # noqa: E402


def attention_diff(q_lens: list[int], ctx: list[int], kv_heads: int, head_dim: int) -> float:
    from palm_serve.kernels.cpu import paged_attention

    batch = make_paged_batch(q_lens, ctx, heads=8, kv_heads=kv_heads, head_dim=head_dim,
                             block_size=16, dtype=torch.float32)  # fmt: skip
    # The twin in fp64 as the reference: in fp32 its own rounding (which varies with the
    # CPU's matmul kernels) would be half of any difference measured.
    q, k_cache, v_cache, *rest = batch.args(*batch.clean_caches())
    expected = twin_paged_attention(q.double(), k_cache.double(), v_cache.double(), *rest)
    actual = paged_attention(*batch.args(batch.k_cache, batch.v_cache))
    # Relative to the largest output: the scalar exp and sums round a few fp32 ulps apart
    # from the AVX2 ones. NaN if a poisoned slot was read.
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def rotary_diff() -> float:
    fused = torch.randn(9, 6 + 2 + 1, 40)
    positions = torch.tensor([0, 1, 2, 15, 16, 17, 300, 511, 7])
    tables = build_cos_sin_cache(40, 512), build_xpos_scale_cache(40, 512, 512.0)
    args = (fused, 6, 2, positions, *tables)
    actual = rotate_fused("palm_serve.kernels.cpu", *args)
    return (actual - rotate_fused("palm_serve.kernels", *args)).abs().max().item()


def main() -> None:
    build.load(isa=[])
    torch.set_num_threads(4)  # context splits merged
    diffs = {
        "mixed": attention_diff([40, 1, 1, 5, 2], [290, 1, 15, 5, 17], 2, 64),
        "head_dim_44": attention_diff([3, 1, 1], [23, 4, 1200], 1, 44),
        "rotary": rotary_diff(),
    }
    print(json.dumps(diffs))


if __name__ == "__main__":
    main()
