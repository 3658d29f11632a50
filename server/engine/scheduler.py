"""Which requests run in the next step and how many prompt tokens each prefills. Plain Python:
no MLX here (kv_capacity is arithmetic), so it can be tested with fake byte counts."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from model.cache import kv_capacity

from .prefix_cache import Entry, PrefixCache
from .request import PromptTooLong, QueueFull, Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_queue: int = 256
    prefill_tokens_per_step: int = 512
    max_model_len: int = 32768
    memory_budget_bytes: int = 8 << 30
    kv_bytes_per_token: int = 0
    state_bytes_per_seq: int = 0


@dataclass
class Step:
    """The plan for one engine step."""

    admitted: list[tuple[Request, Optional[Entry]]] = field(default_factory=list)  # restore these first
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    decode: bool = False  # run one decode step for every request past its prompt

    @property
    def empty(self) -> bool:
        return not (self.admitted or self.prefill or self.decode)


class Scheduler:
    def __init__(self, config: SchedulerConfig, prefix_cache: PrefixCache):
        self.config = config
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved_bytes = 0

    def bytes_for(self, req: Request) -> int:
        """What the runner can allocate for the request: KV for the capacity its longest length
        rounds up to in the decode batch (+1: a step launched ahead may feed one token past its
        end), its fixed-size state."""
        c = self.config
        tokens = min(req.num_prompt + req.params.max_tokens, c.max_model_len) + 1
        return c.state_bytes_per_seq + c.kv_bytes_per_token * kv_capacity(tokens)

    def check(self, req: Request) -> None:
        """The limits a request must fit whatever else is queued."""
        c = self.config
        if req.num_prompt == 0:
            raise ValueError("the prompt is empty")
        if req.num_prompt >= c.max_model_len:
            raise PromptTooLong(
                f"the prompt has {req.num_prompt} tokens; this model's context limit is {c.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        if self.bytes_for(req) > c.memory_budget_bytes:
            raise PromptTooLong(
                f"prompt plus max_tokens needs {self.bytes_for(req)} bytes of state, more than the "
                f"memory budget of {c.memory_budget_bytes}; shorten the prompt or lower max_tokens"
            )

    def check_room(self, arriving: int = 0) -> None:
        """Raises QueueFull when the queue, with `arriving` requests on their way to it, is full."""
        queued = len(self.waiting) + arriving
        if queued >= self.config.max_queue:
            raise QueueFull(f"{queued} requests are already waiting; try again later")

    def add(self, req: Request) -> None:
        """Queues a request that passed `check`."""
        self.check_room()
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, req: Request, budget: int) -> int:
        remaining = req.num_prompt - req.num_computed
        n = min(remaining, budget)
        if not self.prefix_cache.enabled:
            return n
        # end chunks where a snapshot is wanted: at a requested point, else on a block boundary
        cut = next((p for p in req.snapshot_at if req.num_computed < p < req.num_computed + n), None)
        if cut is not None:
            return cut - req.num_computed
        if 0 < n < remaining:
            block = self.prefix_cache.block_size
            aligned = (req.num_computed + n) // block * block
            if aligned > req.num_computed:
                n = aligned - req.num_computed
        return n

    def schedule(self) -> Step:
        step = Step(decode=any(not r.prefilling for r in self.running))
        budget = self.config.prefill_tokens_per_step
        for req in self.running:
            if req.prefilling and budget > 0:
                n = self._chunk(req, budget)
                step.prefill.append((req, n))
                budget -= n
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            need = self.bytes_for(req)
            if self.reserved_bytes + need > self.config.memory_budget_bytes:
                break
            self.waiting.popleft()
            req.status, req.reserved_bytes = Status.RUNNING, need
            self.reserved_bytes += need
            hit, entry = self.prefix_cache.lookup(req.prompt_ids)
            req.num_computed = req.num_cached = hit
            self.running.append(req)
            step.admitted.append((req, entry))
            if req.prefilling and budget > 0:
                n = self._chunk(req, budget)
                step.prefill.append((req, n))
                budget -= n
        return step

    def finish(self, req: Request, reason: str) -> None:
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.reserved_bytes -= req.reserved_bytes
        else:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "reserved_bytes": self.reserved_bytes,
            "memory_budget_bytes": self.config.memory_budget_bytes,
        }
