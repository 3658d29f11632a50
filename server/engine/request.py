"""What a client asks of the engine and what the engine hands back: plain data, no MLX."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

# A logits processor sees the request's generated ids so far and the next-token logits (an
# mx.array [vocab]) and returns new logits; the server uses it for constrained decoding.
LogitsProcessor = Callable[[list[int], "object"], "object"]


class EngineError(Exception):
    """Base of the errors the engine raises for a request it will not run."""


class QueueFull(EngineError):
    """Too many requests are waiting; try again later (HTTP 429)."""


class PromptTooLong(EngineError):
    """The prompt cannot fit the context limit or the memory budget (HTTP 400)."""


class EngineStopped(EngineError):
    """The engine is shutting down or has failed (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def validate(self) -> None:
        problems = []
        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        problems += [f"{name} must be finite" for name in floats if not math.isfinite(getattr(self, name))]
        if self.seed is not None and not 0 <= self.seed < 2**64:
            problems.append("seed must be in [0, 2**64)")  # what mx.random.key takes
        if self.max_tokens < 1:
            problems.append("max_tokens must be at least 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be > 0")
        if not 0 <= self.top_logprobs <= 20:
            problems.append("top_logprobs must be in 0..20")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """One increment of a request's output. `text` never contains part of a stop string and
    never ends inside a multi-byte character. The last delta has finish_reason and usage."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    usage: Optional[Usage] = None


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose state the request's cache holds
    num_cached: int = 0  # prompt tokens restored from the prefix cache
    # prompt offsets, besides block boundaries, where the prefix cache should get a snapshot: a chat
    # prompt's history ends where its generation prompt begins, and the next turn resumes from there
    snapshot_at: tuple[int, ...] = ()
    # those of them that stay while the prefix cache holds their path (never thinned): where a chat's
    # system prompt and tools end, and where the prompt leaves a path already cached (EngineCore.enqueue)
    shared_at: tuple[int, ...] = ()
    reserved_bytes: int = 0
    finish_reason: Optional[str] = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
