"""One model served across mx.distributed ranks (`mlx.launch ... deltaserve serve MODEL --distributed
pipeline|tensor`), in lockstep.

Every rank runs the same EngineCore. Rank 0 serves HTTP; before each of its engine steps it broadcasts
what its engine thread took from the inbox (new requests, cancellations, stops, warm-ups), and every
other rank applies the same items and runs the same step, so scheduling, the prefix cache and the
model's collectives line up by construction. What could still differ is made identical here:
- tokens: rank 0 samples and the others take its tokens (one small all_sum per step), so logits
  processors (grammars, logit_bias), seeds and any float difference never split the ranks;
- budgets: the scheduler's memory budget is the smallest rank's, the bytes per token and per
  sequence the largest rank's, and the prefix cache weighs its entries with those agreed numbers
  (and the smallest rank's cache budget), so every rank keeps, thins and evicts the same entries
  although a pipeline stage holds only its own layers' share of each;
- a digest (step count, live requests, prefix-cache entries and bytes) rides on every message;
  a rank that disagrees stops.
Idle, rank 0 broadcasts only a heartbeat every timeout/4, and the others block on the next message.

Faults: a rank that dies breaks the ring (the next collective raises), a rank that stops answering
trips the watchdog (a lockstep operation, i.e. one step or one wait for a message, past `timeout_s`).
Either way rank 0 ends its streams with an error, answers 503 for `EXIT_GRACE_S` and exits 1;
the other ranks exit 1 at once. Ranks whose model files differ refuse to start (exit 1, naming what
differs). docs/distributed.md has the operator's view."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from server.engine import segments
from server.engine.core import EngineConfig, EngineCore, default_memory_budget
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler

log = logging.getLogger("deltaserve.distributed")

DEFAULT_TIMEOUT_S = 60.0
EXIT_GRACE_S = 2.0  # rank 0, after a fault: time to deliver the error events and answer 503s
_INLINE = 1024  # message bytes sent in the first collective; longer ones take a second


class RankFailure(RuntimeError):
    """Ranks out of step or a failed collective: serving cannot go on."""


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Channel:
    """Collectives over the group, on the CPU stream (the ring backend's)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.root = self.rank == 0

    def sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def broadcast(self, data: Optional[bytes]) -> bytes:
        """Rank 0's bytes on every rank (the others pass None). Sums where only rank 0 contributes."""
        head = np.zeros(8 + _INLINE, np.uint8)
        if self.root:
            head[:8] = np.frombuffer(len(data).to_bytes(8, "little"), np.uint8)
            inline = data[:_INLINE]
            head[8 : 8 + len(inline)] = np.frombuffer(inline, np.uint8)
        got = np.array(self.sum(mx.array(head)))
        n = int.from_bytes(got[:8].tobytes(), "little")
        if n <= _INLINE:
            return got[8 : 8 + n].tobytes()
        rest = np.zeros(n - _INLINE, np.uint8)
        if self.root:
            rest[:] = np.frombuffer(data[_INLINE:], np.uint8)
        return got[8:].tobytes() + np.array(self.sum(mx.array(rest))).tobytes()

    def gather(self, obj) -> list:
        """Every rank's JSON-able `obj`, in rank order."""
        data = json.dumps(obj).encode()
        sizes = mx.distributed.all_gather(mx.array([len(data)], mx.int64), group=self.group, stream=mx.cpu)
        sizes = sizes.tolist()
        buf = np.zeros((1, max(sizes)), np.uint8)
        buf[0, : len(data)] = np.frombuffer(data, np.uint8)
        rows = np.array(mx.distributed.all_gather(mx.array(buf), group=self.group, stream=mx.cpu))
        return [json.loads(row[:n].tobytes()) for row, n in zip(rows, sizes)]

    def max_int(self, value: int) -> int:
        return max(self.gather(int(value)))


class Watchdog:
    """MLX collectives block for good when a peer stops answering: this thread calls `on_timeout`
    when one guarded operation has run for longer than `timeout_s`."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[str], None]):
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout
        self._since: Optional[float] = None
        self._what = ""
        threading.Thread(target=self._watch, name="deltaserve-watchdog", daemon=True).start()

    @contextmanager
    def guard(self, what: str, timeout_s: Optional[float] = None):
        outer = self._since, self._what, self.timeout_s
        self._what, self._since = what, time.monotonic()
        if timeout_s is not None:
            self.timeout_s = timeout_s
        try:
            yield
        finally:
            self._since, self._what, self.timeout_s = outer

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout_s / 8))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.on_timeout(f"{self._what} took longer than {self.timeout_s:g} s (--distributed-timeout): "
                                "a rank stopped answering")
                return


class Lockstep:
    """This rank's side of the protocol; `core` is made by `make_core` (every rank at once)."""

    def __init__(self, group, timeout_s: float = DEFAULT_TIMEOUT_S):
        if timeout_s <= 0:
            raise ValueError("--distributed-timeout must be positive")
        self.channel = Channel(group)
        self.timeout_s = timeout_s
        self.on_failure: Optional[Callable[[str], None]] = None  # rank 0's engine ends its streams here
        self.watchdog = Watchdog(timeout_s, self.fail)
        self._failed = threading.Lock()
        self._closed = False
        self._last_sent = time.monotonic()

    @property
    def rank(self) -> int:
        return self.channel.rank

    def fail(self, reason: str) -> None:
        """Any thread, once: log, let rank 0's engine end its streams, and exit 1 (rank 0 after a grace)."""
        if not self._failed.acquire(blocking=False):
            return
        log.error("rank %d: distributed serving failed: %s; exiting", self.rank, reason)
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("rank %d: ending the requests in flight failed", self.rank)
            threading.Timer(EXIT_GRACE_S, _exit, (1,)).start()
        else:
            _exit(1)

    def make_core(self, model, tokenizer, config: EngineConfig, emit=None) -> "LockstepCore":
        config.prefix_cache_dir = None  # a disk tier could hit on one rank and miss on another
        with self.watchdog.guard("agreeing on the memory budget", self.timeout_s * 10):
            budget = config.memory_budget_bytes or default_memory_budget()
            config.memory_budget_bytes = min(self.channel.gather(int(budget)))
            return LockstepCore(self.channel, model, tokenizer, config, emit)

    # ---- rank 0 ----
    def send(self, items: list, core: EngineCore) -> None:
        """Before a step (there is work or there are items) or, idle, as a heartbeat every timeout/4."""
        if self._closed or not (items or core.has_work() or time.monotonic() - self._last_sent > self.timeout_s / 4):
            return
        msg = {"digest": core.digest(), "items": [_encode(k, v) for k, v in items]}
        with self.watchdog.guard("sending a step to the other ranks"):
            self.channel.broadcast(json.dumps(msg).encode())
        self._last_sent = time.monotonic()

    def close(self) -> None:
        """Rank 0 is shutting down: the other ranks exit 0."""
        if self._closed:
            return
        self._closed = True
        try:
            with self.watchdog.guard("telling the other ranks to stop"):
                self.channel.broadcast(json.dumps({"stop": True}).encode())
        except Exception as e:  # they are gone already
            log.warning("the other ranks did not hear the stop: %s", e)

    # ---- the other ranks ----
    def follow(self, core: "LockstepCore") -> int:
        """A rank other than 0: apply rank 0's messages and step until it says stop (exit 0)."""
        busy = False
        while True:
            with self.watchdog.guard("waiting for rank 0's next step"):
                msg = json.loads(self.channel.broadcast(None))
            if msg.get("stop"):
                log.info("rank %d: rank 0 is stopping", self.rank)
                return 0
            if core.digest() != msg["digest"]:
                raise RankFailure(f"rank {self.rank} is out of step with rank 0: (steps, requests, cache entries, "
                                  f"cache bytes) {core.digest()} here, {msg['digest']} on rank 0")
            warm_ups = []
            for kind, item in msg["items"]:
                if kind == "add":
                    core.enqueue(_decode_request(item))
                elif kind == "cancel":
                    core.cancel(item)
                elif kind == "stop":
                    core.cancel(item, "stop")
                else:
                    warm_ups.append(item)
            for w in warm_ups:
                try:
                    core.warm_up(w["ids"], [_rank0_processor] * w["processors"])
                except Exception:  # rank 0 logs its own; the requests are gone on both
                    log.exception("rank %d: warm-up failed", self.rank)
            if core.has_work():
                busy = True
                core.step()
            elif busy:
                core.idle()
                busy = False


def _rank0_processor(generated, logits):
    """Stands for a logits processor of rank 0's (grammars cannot cross the wire): only rank 0 chooses
    tokens, but every rank must see that a request has processors (it decides whether a decode step is
    launched ahead)."""
    raise AssertionError("only rank 0 runs logits processors")


def _encode(kind: str, item) -> list:
    if kind == "add":
        req: Request = item
        params = {k: v for k, v in asdict(req.params).items() if k != "logits_processors"}
        return [kind, {"id": req.id, "prompt_ids": req.prompt_ids, "params": params,
                       "processors": len(req.params.logits_processors), "snapshot_at": list(req.snapshot_at),
                       "shared_at": list(req.shared_at)}]
    if kind == "warm_up":
        ids, processors, _done = item
        return [kind, {"ids": list(ids), "processors": len(processors)}]
    return [kind, item]


def _decode_request(item: dict) -> Request:
    params = SamplingParams(**item["params"], logits_processors=[_rank0_processor] * item["processors"])
    return Request(item["id"], item["prompt_ids"], params, snapshot_at=tuple(item["snapshot_at"]),
                   shared_at=tuple(item["shared_at"]))


class LockstepSampler(Sampler):
    """Rank 0 chooses; every rank gets rank 0's tokens (and which rows' choosing raised there)."""

    def __init__(self, channel: Channel):
        super().__init__()
        self.channel = channel

    def choose(self, logits: mx.array, requests: list[Request], failed: dict | None = None) -> mx.array:
        # The forward's collectives finish first on every rank: the graphs past the logits differ by
        # rank, and left lazy, the tensor-parallel forward's last collectives and this sum deadlocked.
        mx.eval(logits)
        own: dict[str, Exception] = {}
        if self.channel.root:
            chosen = super().choose(logits, requests, own).astype(mx.uint32)
        else:
            chosen = mx.zeros((len(requests),), dtype=mx.uint32)
        if not self.needs_history(requests):  # choosing on the device cannot fail for one row alone
            chosen = self.channel.sum(chosen)
            # Scheduled now, so that every rank runs its collectives in call order: a later pipeline
            # stage's next forward does not depend on these tokens and would otherwise go first.
            mx.async_eval(chosen)
            return chosen
        flags = mx.array([r.id in own for r in requests], dtype=mx.uint32)
        both = self.channel.sum(mx.concatenate([chosen, flags]))
        mx.eval(both)
        n = len(requests)
        errors = {r.id: own.get(r.id) or RuntimeError("choosing its token failed on rank 0")
                  for r, bad in zip(requests, both[n:].tolist()) if bad}
        if errors:
            if failed is None:
                raise next(iter(errors.values()))
            failed.update(errors)
        return both[:n]


def _agreed_bytes(kv_bytes_per_token: int, state_bytes: int, x) -> int:
    """What a prefix-cache entry weighs on every rank alike: the largest rank's bytes."""
    if isinstance(x, segments.KVSegment):
        return len(x) * kv_bytes_per_token
    if isinstance(x, segments.State):
        return state_bytes
    return x.nbytes  # logits: every rank computes the same


class LockstepCore(EngineCore):
    def __init__(self, channel: Channel, model, tokenizer, config: EngineConfig, emit=None):
        super().__init__(model, tokenizer, config, emit)
        self.channel = channel
        self.sampler = LockstepSampler(channel)
        c = self.scheduler.config
        pc = self.prefix_cache
        ranks = channel.gather([c.kv_bytes_per_token, c.state_bytes_per_seq, pc.budget])
        c.kv_bytes_per_token = max(r[0] for r in ranks)
        c.state_bytes_per_seq = max(r[1] for r in ranks)
        # The prefix cache keeps, thins and evicts by bytes, and each rank holds its own share of a
        # sequence's state (a pipeline stage: its own layers'): every rank weighs entries with the
        # numbers agreed here, so that all of them keep and evict the same ones.
        pc.budget = min(r[2] for r in ranks)
        pc.checkpoint = PrefixCache.checkpoint_for(pc.block_size, c.state_bytes_per_seq, c.kv_bytes_per_token)
        pc.weigh = partial(_agreed_bytes, c.kv_bytes_per_token, c.state_bytes_per_seq)
        self.watchdog: Optional[Watchdog] = None

    def digest(self) -> list:
        """What every rank must agree on before each step."""
        return [self.steps, len(self.requests), len(self.prefix_cache), self.prefix_cache.nbytes]

    def step(self) -> None:
        if self.watchdog is None:
            return super().step()
        with self.watchdog.guard(f"engine step {self.steps}"):
            super().step()


# ---------------------------------------------------------------- the serve command

def check_same_model(channel: Channel, path: Path, dtype: Optional[str]) -> None:
    """Raises RankFailure naming what differs when the ranks hold different model files."""
    from model.fingerprint import differences, identity

    mine = {"host": socket.gethostname(), "path": str(path), "identity": identity(path, dtype or "checkpoint")}
    ranks = channel.gather(mine)
    first = ranks[0]
    problems = [f"rank {r} ({o['host']}:{o['path']}) holds a different model from rank 0 "
                f"({first['host']}:{first['path']}): {'; '.join(differences(first['identity'], o['identity']))}"
                for r, o in enumerate(ranks) if o["identity"] != first["identity"]]
    if problems:
        raise RankFailure("\n".join(problems))


def run(args, settings, options: dict, serve: Callable) -> int:
    """`deltaserve serve --distributed MODE` on one rank. serve(settings, model, tokenizer, lockstep)
    runs rank 0's HTTP server."""
    from model import ModelLoadError, load_tokenizer
    from model.parallel import load_distributed

    from .model_source import ModelSourceError, resolve_model

    if args.distributed_timeout <= 0:
        print("deltaserve serve: error: --distributed-timeout must be positive", file=sys.stderr)
        return 2
    if settings.prefix_cache_dir:
        print("deltaserve serve: error: --prefix-cache-dir does not work with --distributed (a disk hit on one "
              "rank and a miss on another would split the ranks)", file=sys.stderr)
        return 2
    group = mx.distributed.init()
    if group.size() < 2:
        print("deltaserve serve: error: --distributed needs 2 or more ranks; start it with mlx.launch "
              "(e.g. mlx.launch -n 2 -- deltaserve serve MODEL --distributed pipeline)", file=sys.stderr)
        return 2
    lockstep = Lockstep(group, args.distributed_timeout)
    rank = lockstep.rank
    prefix = f"deltaserve (rank {rank}/{group.size()})"
    try:
        path = resolve_model(args.model, options, args.cache_dir, args.revision)
        with lockstep.watchdog.guard("comparing the ranks' model files", lockstep.timeout_s * 10):
            check_same_model(lockstep.channel, Path(path), args.dtype)
        print(f"{prefix}: loading {path} ({args.distributed})", file=sys.stderr, flush=True)
        model = load_distributed(path, args.distributed, group, dtype=args.dtype)
        tokenizer = load_tokenizer(path)
    except (ModelSourceError, ModelLoadError, ValueError, RankFailure) as e:
        print(f"{prefix}: error: {e}", file=sys.stderr, flush=True)
        _exit(1)
    if rank == 0:
        return serve(settings, model, tokenizer, lockstep)
    # mlx.launch signals every rank at once; the others wait for rank 0's drain and its stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        core = lockstep.make_core(model, tokenizer, settings.engine_config())
        core.watchdog = lockstep.watchdog
        code = lockstep.follow(core)
    except Exception as e:
        if not isinstance(e, RankFailure):
            log.exception("rank %d failed", lockstep.rank)
        lockstep.fail(f"{type(e).__name__}: {e}")
        code = 1
    _exit(code)
