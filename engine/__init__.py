"""The inference engine. The front (AsyncEngine: InputProcessor, OutputProcessor, a
CoreClient) tokenizes once, hands token ids to the core and turns its outputs into text;
the core (EngineCore: Scheduler -> ModelRunner -> Sampler, BlockManager) sees token ids
only. The server uses only what is exported here."""

from .async_engine import AsyncEngine, EngineInfo
from .config import EngineConfig
from .errors import EngineDeadError, EngineError, InvalidRequestError
from .factory import build_async_engine, build_engine
from .messages import EngineCoreRequest
from .outputs import FinishReason, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams
from .stats import EngineStats

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineCoreRequest",
    "EngineDeadError",
    "EngineError",
    "EngineInfo",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "build_async_engine",
    "build_engine",
]
