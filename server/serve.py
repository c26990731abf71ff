"""`palm-serve serve`: settings -> engine (model loaded, KV pool allocated) -> app ->
uvicorn with graceful drain on SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .settings import Settings, default_model_dir

if TYPE_CHECKING:
    from ..engine.async_engine import AsyncEngine


def serve(given: dict[str, Any]) -> int:
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"error: --{field.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    problem = model_problem(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if settings.num_threads is not None:
        import torch

        torch.set_num_threads(settings.num_threads)
    engine = load_engine(settings)
    return run_server(settings, engine)


def model_problem(settings: Settings) -> str | None:
    model_dir = settings.model_dir()
    if (model_dir / "config.json").is_file():
        return None
    if settings.model is None:
        return (
            f"no default model is present (expected one at {default_model_dir()}); "
            "pass --model DIR or set PALM_MODEL to a palm-serve model directory "
            "(config.json, model.safetensors; `palm-serve convert` makes one)"
        )
    return f"{model_dir} is not a model directory (no config.json)"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_engine(settings: Settings) -> AsyncEngine:
    """Load the weights and allocate the KV pool, with a progress bar over the steps."""
    from tqdm import tqdm

    from ..engine.config import EngineConfig
    from ..engine.factory import build_engine

    config = EngineConfig(
        block_size=settings.block_size,
        num_blocks=settings.num_kv_blocks,
        kv_cache_memory_bytes=int(settings.kv_cache_memory),
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_model_len=settings.max_model_len,
    )
    with tqdm(total=2, desc="loading model", unit="step", file=sys.stderr) as bar:
        device = resolve_device(settings.device)
        bar.update(1)
        bar.set_description(f"loading {settings.model_dir()} on {device}, allocating KV pool")
        engine = build_engine(
            settings.model_dir(),
            config,
            dtype=settings.dtype,
            device=device,
            kernel_backend=settings.kernel_backend,
            prepack_cpu_linears=settings.cpu_prepacked_linears,
            compile=settings.compile,
        )
        bar.update(1)
    return engine


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def summary(settings: Settings, engine: AsyncEngine) -> str:
    info, device = engine.info, resolve_device(settings.device)
    mc = info.model_config
    tokens = info.num_blocks * info.block_size
    key = "on" if settings.api_key else "off"
    lines = [
        f"palm-serve listening on http://{settings.host}:{settings.port}",
        f"  model    {settings.model_name()} ({Path(settings.model_dir()).resolve()}): "
        f"{mc.depth} layers, dim {mc.dim}, vocab {mc.vocab_size}",
        f"  context  {engine.max_model_len} tokens",
        f"  backend  {info.backend_name} ({settings.dtype}, {device}, "
        f"{_torch_threads()} CPU threads)",
        f"  KV pool  {info.num_blocks} blocks x {info.block_size} tokens = {tokens} tokens",
        f"  limits   max_num_seqs {settings.max_num_seqs}, max_queue {settings.max_queue}, "
        f"max_tokens {settings.max_tokens_limit}, api key {key}",
    ]
    return "\n".join(lines)


def run_server(settings: Settings, engine: AsyncEngine) -> int:
    import uvicorn

    from .app import create_app
    from .lifecycle import DrainingServer, Lifecycle

    lifecycle = Lifecycle()
    app = create_app(settings, engine, lifecycle)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # After the drain, connections still open get this long before being cut.
        timeout_graceful_shutdown=5,
        access_log=settings.log_level == "debug",
    )
    print(summary(settings, engine), flush=True)
    DrainingServer(config, lifecycle, settings.drain_timeout, engine.shutdown).run()
    return 0
