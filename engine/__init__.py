"""The inference engine: block manager, scheduler, model runner, sampler, async front.

The server uses only what is exported here (see AsyncEngine for the contract)."""

from .async_engine import AsyncEngine
from .config import EngineConfig
from .errors import EngineDeadError, EngineError, InvalidRequestError
from .factory import build_engine
from .outputs import FinishReason, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams
from .stats import EngineStats

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "build_engine",
]
