"""Inputs and comparisons shared by the Triton-vs-twin tests (not a test module)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

FP32_ATOL = 1e-4
FP32_ATOL_ATTENTION = 2e-4
# fp16 / bf16: max abs diff over the reference's max abs value. Under the interpreter bf16
# also differs by an ulp (2^-8) where nothing else does: its fp32 -> bf16 cast truncates
# (triton 3.9 _convert_float, no rounding mode) where torch and the GPU round to nearest.
HALF_RTOL = 1e-2


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = FP32_ATOL) -> float:
    """fp32: max abs diff < atol; fp16/bf16: max abs diff <= 1e-2 x max |expected|. Any NaN
    (an element the kernel never wrote, or a poisoned slot it read) fails. Returns the
    figure held against the limit (the abs diff for fp32, the relative one otherwise)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), f"{int(actual.isnan().sum())} NaN elements in the output"
    diff = (actual.float() - expected.float()).abs().max().item()
    if actual.dtype == torch.float32:
        assert diff < atol, f"fp32 max abs diff {diff:.3g} >= {atol}"
    else:
        relative = diff / expected.float().abs().max().item()
        assert relative <= HALF_RTOL, f"{actual.dtype} max abs diff {relative:.3g} of max |ref|"
        return relative
    return diff


@dataclass
class PagedBatch:
    """A mixed batch over a paged cache. k_cache / v_cache hold NaN in every slot no
    sequence owns (free blocks, the tail of last blocks, and the block that pads the
    tables), so a kernel that reads outside a context returns NaN; the twin, which gathers
    padded blocks and masks afterwards, gets clean_caches() (NaN -> 0) instead."""

    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [NB, BS, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [S, width] int32, padded with the poisoned block
    query_start_loc: torch.Tensor  # [S + 1] int32
    context_lens: torch.Tensor  # [S] int32
    scale: float

    def args(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple:
        return (self.q, k_cache, v_cache, self.block_tables, self.query_start_loc,
                self.context_lens, self.scale)  # fmt: skip

    def clean_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache.nan_to_num(0.0), self.v_cache.nan_to_num(0.0)


def make_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> PagedBatch:
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(n_blocks) + 3  # two free blocks and the padding block, all poisoned
    order = torch.randperm(num_blocks, generator=g).tolist()  # shuffled, non-contiguous
    pad_block = order.pop()
    width = max(n_blocks) + 1  # every row has padding after its last block
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = []
    for n, ctx in zip(n_blocks, context_lens, strict=True):
        table, order = order[:n], order[n:]
        tables.append(table + [pad_block] * (width - n))
        for pos in range(ctx):  # only the context's slots get values
            blk, off = table[pos // block_size], pos % block_size
            k_cache[blk, off] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
            v_cache[blk, off] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim, generator=g).to(dtype)
    return PagedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=torch.tensor(tables, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        scale=head_dim**-0.5,
    )


def rotate_fused(
    module: str,
    fused: torch.Tensor,
    heads: int,
    kv_heads: int,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    xpos: torch.Tensor | None,
) -> torch.Tensor:
    """module.rotary_embedding on q = fused[:, :heads] and k = the next kv_heads columns,
    both strided views, in place on a copy of fused [T, heads + kv_heads + 1, D]."""
    fused = fused.clone()
    q, k = fused[:, :heads], fused[:, heads : heads + kv_heads]
    importlib.import_module(module).rotary_embedding(q, k, positions, cos_sin, xpos)
    return fused


# One step of the model: (block tables, new tokens per sequence, tokens cached before).
Step = tuple[list[list[int]], list[list[int]], list[int]]


def run_model_steps(
    model: torch.nn.Module, steps: list[Step], num_blocks: int, block_size: int
) -> list[torch.Tensor]:
    """Run the steps in order over one fresh KVCache; the hidden states of each step."""
    from palm_serve.model import AttentionMetadata, KVCache

    device = next(model.parameters()).device  # the GPU's, when the tests run natively
    cache = KVCache.allocate(model.config, num_blocks, block_size, device=device)
    hidden = []
    for tables, chunks, done in steps:
        ids = [t for chunk in chunks for t in chunk]
        positions = [done[s] + i for s, chunk in enumerate(chunks) for i in range(len(chunk))]
        ctx = [done[s] + len(c) for s, c in enumerate(chunks)]
        meta = AttentionMetadata.build(tables, [len(c) for c in chunks], ctx, block_size, device)
        with torch.no_grad():
            hidden.append(
                model(
                    torch.tensor(ids, device=device),
                    torch.tensor(positions, device=device),
                    cache,
                    meta,
                )
            )
    return hidden


def run_triton_model_steps(
    config,
    state_dict: dict,
    steps: list[Step],
    num_blocks: int,
    block_size: int,
    quantization: str = "none",
) -> list[torch.Tensor]:
    """The same model with the Triton kernels (run inside the interpreter worker); with
    quantization "int8", its blocks' linears through the Triton int8 linear."""
    from palm_serve.kernels import triton_backend
    from palm_serve.model import PaLM
    from palm_serve.model.quantization import quantize_linears

    # On the device of the state dict: the GPU's when the tests run natively.
    device = next(iter(state_dict.values())).device
    model = PaLM(config, kernels=triton_backend()).to(device)
    model.load_state_dict(state_dict)
    if quantization == "int8":
        quantize_linears(model, model.kernels.int8_matmul)
    return run_model_steps(model.eval(), steps, num_blocks, block_size)


def selected_backends() -> tuple[str, str]:
    """(auto, forced triton) backend names on the CPU in this process."""
    from palm_serve.kernels import select_backend

    cpu = torch.device("cpu")
    return select_backend("auto", cpu).name, select_backend("triton", cpu).name
