"""The engine: one frozen GPT-2 serving many prefixes in one batched forward pass."""

from .async_engine import AsyncEngine, EngineStopped
from .client import EngineClient
from .core import EngineConfig, EngineCore, RequestOutput
from .prefixes import PrefixTable
from .request import FinishReason, SamplingParams
from .scheduler import Scheduler, SchedulerConfig

__all__ = [
    "AsyncEngine",
    "EngineClient",
    "EngineConfig",
    "EngineCore",
    "EngineStopped",
    "FinishReason",
    "PrefixTable",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
]
