"""`palm-serve serve`: settings -> placement (which CPUs the front and the core use) ->
engine (the core process started, its model loaded and KV pool allocated) -> app ->
uvicorn with graceful drain on SIGTERM / SIGINT.

Two processes by default: this one (the front: HTTP, tokenization, detokenization, stop
strings, SSE, metrics) and the engine core process it spawns and restarts (model, step
loop); `--no-engine-process` runs the core in a thread of this process instead."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import logging_config
from .placement import OMP_WAIT_VARIABLES, Placement, available_cpus, parse_cpus, plan_placement
from .settings import Settings, default_model_dir

if TYPE_CHECKING:
    from ..engine.async_engine import AsyncEngine
    from ..engine.config import EngineConfig

log = logging.getLogger("palm_serve.server")


# After the drain, connections still open get this long before being cut.
GRACEFUL_SHUTDOWN_SECONDS = 5


def serve(given: dict[str, Any]) -> int:
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"error: --{field.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    placement = None
    if settings.engine_process:
        try:
            placement = placement_for(settings)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if placement.front_cpus is not None and hasattr(os, "sched_setaffinity"):
            # Before any other thread starts: threads inherit the mask of their creator.
            os.sched_setaffinity(0, placement.front_cpus)
    else:
        sleeping_workers()
    problem = model_problem(settings) or rendezvous_problem(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from ..engine import CoreStartError

    # Once the settings and the model are known good: a refused start only prints its error.
    logging_config.configure(settings.log_format, settings.log_level)
    try:
        engine = load_engine(settings, placement)
    except CoreStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return run_server(settings, engine)


def sleeping_workers() -> None:
    """With the engine in a thread of this process, torch's OpenMP workers share the cores
    with the event loop (HTTP, SSE); a spinning or descheduled worker then stalls every
    parallel region, so they sleep instead and each parallel op pays a worker wake-up
    (docs/BENCHMARKS.md has both measured). libgomp reads this when torch loads, so call it
    before anything imports torch; a user's own OMP_WAIT_POLICY or spin count wins
    (PASSIVE would make libgomp ignore a spin count)."""
    if not any(name in os.environ for name in OMP_WAIT_VARIABLES):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def placement_for(settings: Settings) -> Placement:
    """The settings' CPUs and threads, the measured default for what they leave open.
    Tensor parallelism: by default its ranks spread over every CPU (rank r on the r-th,
    modulo their number), one thread each; the front shares them."""
    engine_cpus = parse_cpus(settings.engine_cpus) if settings.engine_cpus else None
    threads = settings.engine_threads
    if settings.tensor_parallel_size > 1:
        engine_cpus, threads = engine_cpus or available_cpus(), 1
    return plan_placement(
        available_cpus(),
        engine_cpus=engine_cpus,
        engine_threads=threads,
        front_cpus=parse_cpus(settings.front_cpus) if settings.front_cpus else None,
        decode_threads=settings.engine_decode_threads,
        weight_bytes=checkpoint_bytes(settings.model_dir()),
    )


def checkpoint_bytes(model_dir: Path) -> int | None:
    """Bytes of the model's safetensors files; None where there are none (not a model
    directory yet: model_problem() reports that)."""
    files = list(Path(model_dir).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


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


def rendezvous_problem(settings: Settings) -> str | None:
    """External tensor-parallel ranks find rank 0 at MASTER_ADDR:MASTER_PORT: a port picked
    at random would be one they cannot know."""
    local = settings.tp_local_ranks
    if local is None or local == settings.tensor_parallel_size or "MASTER_PORT" in os.environ:
        return None
    return (
        f"--tp-local-ranks {local} leaves ranks {local}..{settings.tensor_parallel_size - 1} "
        "to `palm-serve tp-worker` processes: set MASTER_PORT (and MASTER_ADDR, this "
        "host's address as they reach it) to where they meet rank 0"
    )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_engine(settings: Settings, placement: Placement | None = None) -> AsyncEngine:
    """The engine as the settings ask: its core process started and ready (the model loaded
    and the KV pool allocated there), or with --no-engine-process the model loaded here.
    The placement defaults to the settings' (the front's own affinity is serve()'s job)."""
    from ..engine.config import EngineConfig

    # The placement is the core process's; an engine in this process has none.
    placement = (placement or placement_for(settings)) if settings.engine_process else None
    config = EngineConfig(
        block_size=settings.block_size,
        num_blocks=settings.num_kv_blocks,
        kv_cache_memory_bytes=int(settings.kv_cache_memory),
        kv_cache_dtype=settings.engine_kv_cache_dtype(),
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_model_len=settings.max_model_len,
        speculative_ngram=settings.speculative_ngram,
        num_speculative_tokens=settings.num_speculative_tokens,
        ngram_min=settings.ngram_min,
        ngram_max=settings.ngram_max,
        speculative_max_running=settings.speculative_max_running,
        decode_threads=placement.decode_threads if placement else settings.engine_decode_threads,
        num_scheduler_steps=settings.num_scheduler_steps,
        scheduler_steps_max_ms=settings.scheduler_steps_max_ms,
    )
    if placement is not None:
        return _process_engine(settings, config, placement)
    return _thread_engine(settings, config)


def _process_engine(settings: Settings, config: EngineConfig, placement: Placement) -> AsyncEngine:
    from ..engine.core_main import CoreSpec
    from ..engine.core_process import CoreProcessOptions, build_process_engine

    device = resolve_device(settings.device)
    spec = CoreSpec(
        model_dir=str(settings.model_dir()),
        engine_config=config,
        dtype=settings.dtype,
        device=device,
        kernel_backend=settings.kernel_backend,
        prepack_cpu_linears=settings.cpu_prepacked_linears,
        compile=settings.compile,
        fused_step=settings.fused_step,
        seed=None,
        threads=placement.engine_threads,
        cpus=placement.engine_cpus,
        tensor_parallel_size=settings.tensor_parallel_size,
        tp_timeout=settings.tp_timeout,
        tp_local_ranks=settings.tp_local_ranks,
        logging_config=logging_config.core_config(settings.log_format, settings.log_level),
        quantization=settings.quantization,
    )
    options = CoreProcessOptions(
        restarts=settings.engine_restarts,
        restart_backoff=settings.engine_restart_backoff,
        environment=placement.core_environment,
    )
    log.info("starting the engine core process: %s on %s", settings.model_dir(), device)
    return build_process_engine(spec, options)


def _thread_engine(settings: Settings, config: EngineConfig) -> AsyncEngine:
    """Load the weights and allocate the KV pool here, with a progress bar over the steps."""
    import torch
    from tqdm import tqdm

    from ..engine.factory import build_engine

    if settings.engine_threads is not None:
        torch.set_num_threads(settings.engine_threads)
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
            fused_step=settings.fused_step,
            quantization=settings.quantization,
        )
        bar.update(1)
    return engine


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _where(engine: AsyncEngine) -> str:
    info = engine.info
    if info.core_pid is None:
        return "in a thread of this process (--no-engine-process)"
    core = ",".join(map(str, info.cpus)) or "any"
    front = ",".join(map(str, available_cpus()))
    return f"core process {info.core_pid} on CPU {core}; this process (front) on CPU {front}"


def summary(settings: Settings, engine: AsyncEngine) -> str:
    info, device = engine.info, resolve_device(settings.device)
    mc = info.model_config
    tokens = info.num_blocks * info.block_size
    key = "on" if settings.api_key else "off"
    threads = info.num_threads or _torch_threads()
    lines = [
        f"palm-serve listening on http://{settings.host}:{settings.port}",
        f"  model    {settings.model_name()} ({Path(settings.model_dir()).resolve()}): "
        f"{mc.depth} layers, dim {mc.dim}, vocab {mc.vocab_size}",
        f"  context  {engine.max_model_len} tokens",
        f"  backend  {info.backend_name} ({settings.dtype}, {device}, {threads} CPU thread"
        + ("s" if threads != 1 else "")
        + (
            f"; decode steps on {info.decode_threads})"
            if info.decode_threads not in (None, threads)
            else ")"
        ),
        f"  engine   {_where(engine)}",
        *(
            [
                f"  tensor   {settings.tensor_parallel_size} ranks (one thread each"
                + (
                    f"; {settings.tensor_parallel_size - settings.tp_local_ranks} external"
                    if settings.tp_local_ranks is not None
                    else ""
                )
                + f"), collective timeout {settings.tp_timeout:g} s"
            ]
            if settings.tensor_parallel_size > 1
            else []
        ),
        f"  weights  {info.weight_bytes / 2**20:.1f} MiB (quantization {settings.quantization})",
        f"  KV pool  {info.num_blocks} blocks x {info.block_size} tokens = {tokens} tokens "
        f"({settings.engine_kv_cache_dtype() or settings.dtype})",
        f"  limits   max_num_seqs {settings.max_num_seqs}, max_queue {settings.max_queue}, "
        f"max_tokens {settings.max_tokens_limit}, api key {key}",
    ]
    return "\n".join(lines)


def run_server(settings: Settings, engine: AsyncEngine) -> int:
    from .app import create_app
    from .http_protocol import uvicorn_config
    from .lifecycle import DrainingServer, Lifecycle

    lifecycle = Lifecycle()
    app = create_app(settings, engine, lifecycle, freeze_heap=True)
    config = uvicorn_config(
        app,
        settings.header_read_timeout,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # Logging is logging_config's (configured in serve()); the access lines are
        # AccessLogMiddleware's.
        log_config=None,
        access_log=False,
    )
    print(summary(settings, engine), flush=True)
    DrainingServer(
        config, lifecycle, settings.drain_timeout, engine.shutdown, settings.drain_delay
    ).run()
    return 0
