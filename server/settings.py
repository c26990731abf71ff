"""Settings: one pydantic-settings object. Every field is a `PALM_*` environment variable
and a `--kebab-case` flag of `palm-serve serve` with the same name (see cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    ByteSize,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024


def default_model_dir() -> Path:
    """The small model that ships with the project (model/default/ beside the model package)."""
    from .. import model

    return Path(model.__file__).parent / "default"


class Settings(BaseSettings):
    """Everything `palm-serve serve` can be told. Frozen once built: read, never mutated."""

    model_config = SettingsConfigDict(env_prefix="PALM_", frozen=True, extra="forbid")

    model: Path | None = Field(
        None,
        description="model directory (config.json, model.safetensors[, tokenizer.json]); "
        "default: the model shipped in model/default/",
    )
    served_model_name: str | None = Field(
        None,
        description="the name /v1/models reports and clients send; default: the directory name",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in the container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weights dtype (and the KV cache's, unless kv_cache_dtype)"
    )
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="KV-cache dtype: auto (dtype's), or bfloat16/float16 under float32 "
        "weights: twice the tokens per byte of kv_cache_memory and half the bytes attention "
        "reads, outputs near but not equal to float32's",
    )
    device: str = Field(
        "auto", description="torch device: auto (cuda if present), cpu, cuda, cuda:1"
    )
    kernel_backend: Literal["auto", "torch", "triton", "cpu"] = Field(
        "auto", description="attention kernels: auto (Triton on CUDA, else cpu if it builds)"
    )
    engine_process: bool = Field(
        True,
        description="run the engine core (model, step loop) in a process of its own; off: "
        "in a thread of the server's process (debugging, one CPU)",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="ranks the model is split over (tensor parallelism, torch.distributed: "
        "gloo on CPU, NCCL on CUDA); the engine core is rank 0 and starts the others",
    )
    tp_local_ranks: int | None = Field(
        None,
        ge=1,
        description="tensor-parallel ranks the engine core starts on this machine (0..K-1); "
        "the others run elsewhere as `palm-serve tp-worker --rank R` and meet rank 0 at "
        "MASTER_ADDR:MASTER_PORT; default: all of them",
    )
    tp_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a tensor-parallel collective may wait on a rank; then the "
        "engine core fails and restarts",
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of the engine core; default: one per engine CPU "
        "(with --no-engine-process: torch's, one per core)",
    )
    engine_decode_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the engine core for a step of decodes only (no prompt "
        "work); default: the core's threads, or one for a model under 64 MiB whose core "
        "shares its CPUs with the front",
    )
    engine_cpus: str | None = Field(
        None,
        description="CPUs the engine core process runs on, as taskset -c takes them "
        "('1', '0-3', '0,2'); default: all but the first (two CPUs or fewer: all)",
    )
    front_cpus: str | None = Field(
        None,
        description="CPUs the HTTP front (this process) runs on; default: those the engine "
        "core does not use (none left: not pinned)",
    )
    engine_restarts: int = Field(
        3, ge=0, description="times a dead engine core process is restarted over the server's life"
    )
    engine_restart_backoff: float = Field(
        1.0, ge=0, description="seconds before the first restart of a dead core; doubled each time"
    )
    cpu_prepacked_linears: bool = Field(
        True,
        description="on a CPU in float32, pack the weights once: in panels for our AVX-512 "
        "kernel where it runs, else for oneDNN (faster small-batch matmuls)",
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        description="int8: weight-only int8 for every linear of the blocks and an untied "
        "logits head (per-channel scales; ~4x fewer weight bytes); the embedding, and a "
        "tied head, keep --dtype",
    )
    compile: bool = Field(
        True,
        description="on a CPU with the compiled kernels, torch.compile the step at start "
        "(one graph for every batch, cached across restarts); no C++ compiler: eager twins",
    )
    fused_step: bool = Field(
        True,
        description="with --compile, run the forward of a PaLM or Llama model as one fused "
        "C++ call (palm_cpu::decoder_forward, faster) instead of the torch.compile graph, "
        "where it can (panel-packed fp32 linears, no int8, no tensor parallelism)",
    )
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    kv_cache_memory: ByteSize = Field(
        ByteSize(512 * MIB), description="memory for the KV-cache pool (bytes, or '512MiB', '2GiB')"
    )
    num_kv_blocks: int | None = Field(
        None, ge=1, description="exact KV pool size in blocks (overrides kv_cache_memory)"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="context length (prompt + output); default: the model's"
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together in one step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one engine step")
    enable_prefix_caching: bool = Field(
        True, description="share KV blocks of common prompt prefixes"
    )
    speculative_ngram: bool = Field(
        False,
        description="n-gram speculative decoding: draft tokens from the longest suffix match "
        "in the request's own prompt and output, verified in one forward pass",
    )
    num_speculative_tokens: int = Field(
        4, ge=1, le=64, description="draft tokens proposed per step (--speculative-ngram)"
    )
    ngram_min: int = Field(1, ge=1, description="shortest suffix n-gram looked up for a draft")
    ngram_max: int = Field(3, ge=1, description="longest suffix n-gram looked up for a draft")
    speculative_max_running: int = Field(
        16,
        ge=1,
        description="speculate only while at most this many requests run (larger batches "
        "are compute-bound: verifying drafts costs more than it saves)",
    )
    num_scheduler_steps: int = Field(
        8,
        ge=1,
        le=64,
        description="most forward passes per scheduling decision for a batch of plain "
        "decodes: each pass's tokens feed the next, and the engine's Python runs once for "
        "them all (1: one pass per step)",
    )
    scheduler_steps_max_ms: float = Field(
        25.0,
        gt=0,
        description="a plan of several passes ends before a pass would end past this many "
        "milliseconds: tokens stream at least this often",
    )
    max_queue: int = Field(
        256, ge=0, description="requests allowed to wait for a slot; past it: 429 with Retry-After"
    )
    api_key: SecretStr | None = Field(
        None,
        description="if set, every route but /health, /ready, /metrics and the docs "
        "needs 'Authorization: Bearer <key>'",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS ('*' for any)"
    )
    max_request_bytes: int = Field(
        1 * MIB, ge=1024, description="largest request body; past it: 413"
    )
    max_tokens_limit: int = Field(
        4096, ge=1, description="largest max_tokens a request may ask for"
    )
    header_read_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client gets to send a request's headers; then the "
        "connection is closed",
    )
    body_read_timeout: float = Field(
        30.0, gt=0, description="seconds a client gets to send a request's body; then 408"
    )
    stream_stall_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a stream may wait on a client that does not read; then the "
        "request is aborted and its KV blocks freed",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds running requests get to finish after SIGTERM"
    )
    drain_delay: float = Field(
        0.0,
        ge=0,
        description="seconds after SIGTERM during which /ready answers 503 but requests are "
        "still admitted, so a load balancer checking /ready stops sending before the drain "
        "refuses any (0 under Kubernetes, whose preStop hook waits instead)",
    )
    playground: bool = Field(
        True,
        description="serve the web playground at / (a page that calls this server's API); "
        "off: / is a 404",
    )
    chat_template: Path | None = Field(
        None, description="Jinja2 chat template file for /v1/chat/completions (default: built in)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the server (access lines are info)"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines as readable text or as JSON objects, one a line; both carry "
        "the request id",
    )
    log_requests: bool = Field(
        False,
        description="log prompts and generated text (and the messages of unexpected errors, "
        "which may quote a request); off, no user text reaches the log at any level",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # Environment and CLI give one string: "https://a.example,https://b.example".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("engine_cpus", "front_cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        from .placement import parse_cpus

        if value is not None:
            parse_cpus(value)  # raises ValueError naming the bad part
        return value

    @model_validator(mode="after")
    def _pinning_needs_a_process(self) -> Settings:
        if not self.engine_process and (self.engine_cpus or self.front_cpus):
            raise ValueError("engine_cpus and front_cpus need the engine in its own process")
        return self

    @field_validator("tensor_parallel_size")
    @classmethod
    def _ranks_need_a_process(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and not info.data.get("engine_process", True):
            raise ValueError(
                "tensor parallelism needs the engine core process (drop --no-engine-process)"
            )
        return value

    @model_validator(mode="after")
    def _local_ranks_within_the_group(self) -> Settings:
        local = self.tp_local_ranks
        if local is not None and local > self.tensor_parallel_size:
            raise ValueError(
                f"--tp-local-ranks ({local}) must be <= --tensor-parallel-size "
                f"({self.tensor_parallel_size})"
            )
        return self

    @model_validator(mode="after")
    def _ngram_range(self) -> Settings:
        if self.ngram_max < self.ngram_min:
            raise ValueError(
                f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})"
            )
        return self

    @model_validator(mode="after")
    def _kv_cache_dtype_with_dtype(self) -> Settings:
        cache = self.kv_cache_dtype
        if cache not in ("auto", self.dtype) and self.dtype != "float32":
            raise ValueError(
                f"kv_cache_dtype {cache} needs dtype float32 or dtype {cache}, not {self.dtype}"
            )
        return self

    def engine_kv_cache_dtype(self) -> str | None:
        """kv_cache_dtype as EngineConfig takes it (None: the weights' dtype)."""
        return None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @model_validator(mode="after")
    def _int8_combinations(self) -> Settings:
        if self.quantization == "none":
            return self
        if self.tensor_parallel_size > 1:
            raise ValueError("quantization int8 does not shard yet: use tensor_parallel_size 1")
        if self.device == "cpu" and self.dtype != "float32":
            raise ValueError(
                f"quantization int8 on the CPU runs float32 activations: dtype {self.dtype} "
                "is not supported (use dtype float32)"
            )
        return self

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"chat template file {value} does not exist")
        return value

    def model_dir(self) -> Path:
        return self.model if self.model is not None else default_model_dir()

    def model_name(self) -> str:
        return self.served_model_name or self.model_dir().resolve().name
