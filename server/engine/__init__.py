"""The engine: one frozen GPT-2 serving many prefixes in one batched forward pass."""

from .async_engine import AsyncEngine
from .client import ProcessClient
from .core import EngineConfig, EngineCore
from .frontend import EngineClient, EngineStopped, OfflineEngine
from .prefixes import PrefixTable
from .request import FinishReason, RequestOutput, SamplingParams
from .scheduler import Scheduler, SchedulerConfig

__all__ = [
    "AsyncEngine",
    "EngineClient",
    "EngineConfig",
    "EngineCore",
    "EngineStopped",
    "FinishReason",
    "OfflineEngine",
    "PrefixTable",
    "ProcessClient",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
]
