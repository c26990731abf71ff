"""The inference engine. The front (AsyncEngine: InputProcessor, OutputProcessor, a
CoreClient) tokenizes once, hands token ids to the core and turns its outputs into text;
the core (EngineCore: Scheduler -> ModelRunner -> Sampler, BlockManager) sees token ids
only. The served core runs in a process of its own (ProcessCoreClient, which restarts it
when it dies; build_process_engine); build_engine and build_async_engine run it in a
thread of the caller's process (tests, embedding)."""

from .async_engine import AsyncEngine, EngineInfo, EngineStatus
from .config import EngineConfig
from .core_main import CoreSpec
from .core_process import CoreProcessOptions, CoreStartError, build_process_engine
from .errors import EngineDeadError, EngineError, InvalidRequestError
from .factory import build_async_engine, build_engine
from .messages import EngineCoreRequest
from .outputs import FinishReason, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams
from .stats import EngineStats

__all__ = [
    "AsyncEngine",
    "CoreProcessOptions",
    "CoreSpec",
    "CoreStartError",
    "EngineConfig",
    "EngineCoreRequest",
    "EngineDeadError",
    "EngineError",
    "EngineInfo",
    "EngineStatus",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "build_async_engine",
    "build_engine",
    "build_process_engine",
]
