"""Building an engine: from a model directory (the server) or an in-memory model (tests).

The engine uses only the narrow model interface: model.config.{depth, n_kv_heads,
dim_head, vocab_size, max_positions, eos_token_id}, model.forward, model.compute_logits,
and KVCache.allocate(model.config, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..kernels import select_backend
from ..model.cpu_linear import prepack_linears
from ..model.kv_cache import KVCache
from ..model.tokenizer import Tokenizer, load_tokenizer
from ..model.weights import load_model
from .async_engine import AsyncEngine
from .block_manager import BlockManager
from .config import EngineConfig
from .llm_engine import LLMEngine
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .stop_checker import StopRules

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_engine(
    model_dir: str | Path,
    engine_config: EngineConfig | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    kernel_backend: str = "auto",
    prepack_cpu_linears: bool = False,
) -> AsyncEngine:
    """prepack_cpu_linears: on a CPU in fp32, reorder the weights once for oneDNN (faster
    small-batch matmuls; outputs equal to ~1e-6 relative, not bit for bit)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    backend = select_backend(kernel_backend, torch.device(device))  # type: ignore[arg-type]
    model = load_model(model_dir, kernels=backend, dtype=DTYPES[dtype], device=device)
    if prepack_cpu_linears:
        prepack_linears(model)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    return AsyncEngine.from_model(model, tokenizer, engine_config, backend_name=backend.name)


def build_llm_engine(
    model: Any, tokenizer: Tokenizer, config: EngineConfig, seed: int | None = None
) -> LLMEngine:
    mc = model.config
    param = next(model.parameters())
    num_blocks = config.num_blocks or pool_blocks(mc, config, param.dtype)
    max_model_len = context_length(mc, config, num_blocks)
    kv_cache = KVCache.allocate(mc, num_blocks, config.block_size, param.dtype, param.device)
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    eos = mc.eos_token_id if mc.eos_token_id is not None else tokenizer.eos_token_id
    scheduler = Scheduler(config, block_manager, max_model_len, StopRules(eos))
    runner = ModelRunner(model, kv_cache, config.block_size, Sampler())
    return LLMEngine(scheduler, runner, tokenizer, seed=seed)


def pool_blocks(model_config: Any, config: EngineConfig, dtype: torch.dtype) -> int:
    """Blocks that fit kv_cache_memory_bytes: K and V of every layer per block."""
    element = torch.empty((), dtype=dtype).element_size()
    per_block = (
        2
        * model_config.depth
        * config.block_size
        * model_config.n_kv_heads
        * model_config.dim_head
        * element
    )
    num_blocks = config.kv_cache_memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={config.kv_cache_memory_bytes} holds no block "
            f"({per_block} bytes each)"
        )
    return num_blocks


def context_length(model_config: Any, config: EngineConfig, num_blocks: int) -> int:
    """max_model_len: as configured (default the model's max_positions), capped by the
    pool so that one sequence of that length always fits alone (no endless preemption)."""
    limit = model_config.max_positions
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} exceeds the model's max_positions={limit}"
        )
    return min(config.max_model_len or limit, num_blocks * config.block_size)
