"""Construction of the engine, in one place: the core from a model (or a model directory),
the synchronous LLMEngine and the AsyncEngine the server talks to, its core in a thread
of this process. An AsyncEngine whose core runs in a process of its own is built by
core_process.build_process_engine (that core builds itself with build_core, here).

The core uses only the narrow model interface (model.decoder.DecoderModel): its config,
forward, compute_logits, and KVCache.allocate(model.config, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..kernels import select_backend
from ..model.compiled import compile_model, compiler_problem
from ..model.cpu_linear import prepack_linears
from ..model.decoder import DecoderModel
from ..model.kv_cache import KVCache
from ..model.model_config import ModelConfig
from ..model.quantization import QUANTIZATIONS, linear_weight_bytes, quantize_linears, weight_bytes
from ..model.tokenizer import Tokenizer, load_tokenizer
from ..model.weights import load_model
from .async_engine import AsyncEngine, EngineInfo
from .block_manager import BlockManager
from .config import EngineConfig
from .core import EngineCore
from .core_client import CoreClient, InProcessCoreClient
from .draft_policy import DraftPolicy
from .input_processor import InputProcessor
from .llm_engine import LLMEngine
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .sampler import Sampler
from .scheduler import Scheduler
from .structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_served_model(
    model_dir: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    kernel_backend: str = "auto",
    prepack_cpu_linears: bool = False,
    compile: bool = False,
    fused_step: bool = True,
    block_size: int = EngineConfig.block_size,
    quantization: str = "none",
    kv_cache_dtype: str | None = None,
) -> DecoderModel:
    """The model as the server runs it. prepack_cpu_linears: on a CPU in fp32, reorder the
    weights once for oneDNN (faster small-batch matmuls; outputs equal to ~1e-6 relative,
    not bit for bit). compile: torch.compile the step now (model/compiled.py) for KV caches
    of block_size and kv_cache_dtype (None: the model's dtype), or with fused_step its
    forward fused in C++ where that serves (model/fused_forward.py); with no C++ compiler, the
    torch twins run eagerly instead, said in one log line. quantization "int8": the blocks'
    linears in int8 (model/quantization.py)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
    if quantization == "int8" and torch.device(device).type == "cpu" and dtype != "float32":
        raise ValueError(f"quantization int8 on the CPU needs dtype float32, not {dtype}")
    if compile and kernel_backend == "auto" and torch.device(device).type == "cpu":
        problem = compiler_problem()
        if problem is not None:
            logger.warning("%s: the step runs eagerly on the torch kernel twins", problem)
            kernel_backend, compile = "torch", False
    backend = select_backend(kernel_backend, torch.device(device))  # type: ignore[arg-type]
    model = load_model(model_dir, kernels=backend, dtype=DTYPES[dtype], device=device)
    if quantization == "int8":
        _quantize(model)
    if prepack_cpu_linears:
        prepack_linears(model)
    if compile:
        param = next(model.parameters())
        cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, param.dtype)
        compile_model(model, block_size, kv_cache_dtype=cache_dtype, fuse=fused_step)
    return model


def _quantize(model: DecoderModel) -> None:
    before, linears_before = weight_bytes(model), linear_weight_bytes(model)
    count = quantize_linears(model, model.kernels.int8_matmul)
    after, linears_after = weight_bytes(model), linear_weight_bytes(model)
    logger.info(
        "int8 weights (%s kernel): %d linears %.1f -> %.1f MiB (%.2fx smaller); "
        "all weights %.1f -> %.1f MiB",
        model.kernels.int8_matmul.name,
        count,
        linears_before / 2**20,
        linears_after / 2**20,
        linears_before / max(linears_after, 1),
        before / 2**20,
        after / 2**20,
    )


def build_engine(
    model_dir: str | Path,
    engine_config: EngineConfig | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    kernel_backend: str = "auto",
    prepack_cpu_linears: bool = False,
    compile: bool = False,
    fused_step: bool = True,
    quantization: str = "none",
) -> AsyncEngine:
    """An AsyncEngine over a model directory, its core in a thread of this process."""
    engine_config = engine_config or EngineConfig()
    model = load_served_model(
        model_dir,
        dtype=dtype,
        device=device,
        kernel_backend=kernel_backend,
        prepack_cpu_linears=prepack_cpu_linears,
        compile=compile,
        fused_step=fused_step,
        block_size=engine_config.block_size,
        quantization=quantization,
        kv_cache_dtype=engine_config.kv_cache_dtype,
    )
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    return build_async_engine(model, tokenizer, engine_config)


def build_core(
    model: DecoderModel, config: EngineConfig, tokenizer: Tokenizer, seed: int | None = None
) -> EngineCore:
    """The core; the tokenizer gives the EOS id when the model's config names none, and
    the token bytes structured output compiles grammars against."""
    mc = model.config
    param = next(model.parameters())
    cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, param.dtype)
    num_blocks = config.num_blocks or pool_blocks(mc, config, cache_dtype)
    max_model_len = context_length(mc, config, num_blocks)
    kv_cache = KVCache.allocate(mc, num_blocks, config.block_size, cache_dtype, param.device)
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    eos = mc.eos_token_id if mc.eos_token_id is not None else tokenizer.eos_token_id
    drafts = DraftPolicy(config, max_model_len) if config.speculative_ngram else None
    scheduler = Scheduler(config, block_manager, max_model_len, eos, drafts)
    sampler = Sampler(model.kernels.argmax_rows)
    runner = ModelRunner(model, kv_cache, config.block_size, sampler, config.decode_threads)
    structured = StructuredOutputManager(tokenizer, mc.vocab_size, torch.get_num_threads())
    return EngineCore(scheduler, runner, seed=seed, structured=structured)


def build_llm_engine(
    model: DecoderModel, tokenizer: Tokenizer, config: EngineConfig, seed: int | None = None
) -> LLMEngine:
    core = build_core(model, config, tokenizer, seed)
    inputs = InputProcessor(tokenizer, model.config.vocab_size, core.max_model_len)
    return LLMEngine(core, inputs, OutputProcessor(tokenizer))


def build_async_engine(
    model: DecoderModel,
    tokenizer: Tokenizer,
    config: EngineConfig,
    *,
    seed: int | None = None,
) -> AsyncEngine:
    """An AsyncEngine over an in-memory model, its core in a worker thread."""
    core = build_core(model, config, tokenizer, seed)
    client: CoreClient = InProcessCoreClient(core)
    return AsyncEngine(client, tokenizer, core_info(core, model))


def core_info(core: EngineCore, model: DecoderModel) -> EngineInfo:
    bm = core.block_manager
    return EngineInfo(
        model_config=model.config,
        max_model_len=core.max_model_len,
        num_blocks=bm.num_blocks,
        block_size=bm.block_size,
        backend_name=model.kernels.name,
        weight_bytes=served_weight_bytes(model),
    )


def served_weight_bytes(model: DecoderModel) -> int:
    """weight_bytes of a loaded model; 0 for a tensor-parallel proxy (its ranks hold them)."""
    return weight_bytes(model) if isinstance(model, torch.nn.Module) else 0


def resolve_kv_cache_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype: the one named, or (None) the model's. The kernels read a cache of
    the model's dtype, or a 16-bit one under fp32 weights (q, the softmax and the output
    stay fp32; K and V are rounded to nearest even as they are written)."""
    if name is None:
        return model_dtype
    if name not in DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype != model_dtype and model_dtype != torch.float32:
        raise ValueError(
            f"kv_cache_dtype {name} needs float32 weights or weights of that dtype, "
            f"not {str(model_dtype).removeprefix('torch.')}"
        )
    return dtype


def pool_blocks(model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> int:
    """Blocks that fit kv_cache_memory_bytes: K and V of every layer per block."""
    per_block = KVCache.bytes_per_block(model_config, config.block_size, dtype)
    num_blocks = config.kv_cache_memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={config.kv_cache_memory_bytes} holds no block "
            f"({per_block} bytes each)"
        )
    return num_blocks


def context_length(model_config: ModelConfig, config: EngineConfig, num_blocks: int) -> int:
    """max_model_len: as configured (default the model's max_positions), capped by the
    pool so that one sequence of that length always fits alone (no endless preemption)."""
    limit = model_config.max_positions
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} exceeds the model's max_positions={limit}"
        )
    return min(config.max_model_len or limit, num_blocks * config.block_size)
