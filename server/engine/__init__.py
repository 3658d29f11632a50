"""Continuous batching with a prefix cache for hybrid (recurrent + attention) state."""

from .core import EngineConfig, EngineCore
from .engine import Engine, Stream
from .request import (
    Delta,
    EngineError,
    EngineStopped,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    TokenLogprob,
    Usage,
)

__all__ = [
    "Delta", "Engine", "EngineConfig", "EngineCore", "EngineError", "EngineStopped", "PromptTooLong",
    "QueueFull", "SamplingParams", "Stream", "TokenLogprob", "Usage",
]
