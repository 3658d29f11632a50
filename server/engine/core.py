"""One synchronous engine step: schedule, run the model, sample, turn tokens into deltas."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from model import Model
from model.cache import KVLayer, LinearLayer

from .detokenizer import Detokenizer, StopStrings, hidden_token_ids
from . import segments, speculative
from .disk_cache import DiskCache
from .prefix_cache import Entry, PrefixCache
from .request import Delta, Request, SamplingParams, Usage
from .runner import Runner
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("deltaserve.engine")


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_queue: int = 256
    prefill_tokens_per_step: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    memory_budget_bytes: int | None = None  # default: a fraction of this machine's memory
    prefix_cache_bytes: int | None = None  # default: a quarter of the memory budget; 0 disables
    block_size: int = 256
    # launch the next decode step before reading this one's tokens, so the host's per-token work
    # (detokenizing, stop strings, streaming) overlaps the device's compute
    decode_ahead: bool = True
    # MLX keeps freed buffers for reuse; this bounds what it keeps (default: a sixteenth of the
    # memory budget), and the engine empties it whenever it goes idle
    allocator_cache_bytes: int | None = None
    # the prefix cache's disk tier (server/engine/disk_cache.py): off when prefix_cache_dir is None
    prefix_cache_dir: str | None = None
    prefix_cache_disk_bytes: int = 0
    model_fingerprint: str = ""  # keys disk entries, so that another model (or quantisation) never hits
    # speculative decoding with the model's MTP head: drafts per row and step (0: off); replaces
    # decode_ahead (the next step's input depends on this step's acceptance, read on the host)
    num_speculative_tokens: int = 0
    # the depth follows measured throughput (speculative.DepthController); False: always K
    speculative_adapt: bool = True


def default_memory_budget() -> int:
    try:
        total = mx.device_info()["memory_size"]
    except Exception:  # backends without device_info: fall back to the machine's RAM
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    active = mx.get_active_memory()
    return max(int(total * 0.7) - active, 256 << 20)


class _Output:
    """Per-request text state: detokenizer and stop-string holdback."""

    def __init__(self, tokenizer, hidden: frozenset[int], stops: list[str]):
        self.detok = Detokenizer(tokenizer, hidden) if tokenizer is not None else None
        self.stops = StopStrings(stops)


class EngineCore:
    def __init__(self, model: Model, tokenizer, config: EngineConfig | None = None,
                 emit: Callable[[Delta], None] | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.runner = Runner(model, config.num_speculative_tokens)
        budget = config.memory_budget_bytes or default_memory_budget()
        cache_bytes = budget // 4 if config.prefix_cache_bytes is None else config.prefix_cache_bytes
        kv_per_token, state_per_seq = self.runner.kv_bytes_per_token(), self.runner.state_bytes_per_seq()
        checkpoint = PrefixCache.checkpoint_for(config.block_size, state_per_seq, kv_per_token)
        self.prefix_cache = PrefixCache(cache_bytes, config.block_size, checkpoint, on_evict=self._evicted)
        # the layers this model instance holds state for (a pipeline stage: its own layers only)
        self._layer_types = ["full_attention" if isinstance(layer, KVLayer) else "linear_attention"
                             for layer in model.make_cache(1).layers]
        self.disk = (DiskCache(config.prefix_cache_dir, config.prefix_cache_disk_bytes, config.model_fingerprint)
                     if config.prefix_cache_dir else None)
        mx.set_cache_limit(budget // 16 if config.allocator_cache_bytes is None else config.allocator_cache_bytes)
        self.model_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        spec_per_token, spec_per_seq = self.runner.speculative_bytes()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_queue=config.max_queue,
                prefill_tokens_per_step=config.prefill_tokens_per_step,
                max_model_len=config.max_model_len or model.config.max_position_embeddings,
                memory_budget_bytes=max(budget - cache_bytes, 1),
                kv_bytes_per_token=kv_per_token + spec_per_token,
                state_bytes_per_seq=state_per_seq + spec_per_seq,
            ),
            self.prefix_cache,
        )
        self.sampler = Sampler()
        self.emit = emit or (lambda d: None)
        self.requests: dict[str, Request] = {}
        self._outputs: dict[str, _Output] = {}
        self._cancelled: dict[str, str] = {}  # request id -> finish reason
        eos = set(model.config.eos_token_id)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self._hidden_ids = hidden_token_ids(tokenizer) if tokenizer is not None else frozenset()
        self.steps = 0
        # speculative decoding: drafts made and accepted, per draft position
        self.drafted = [0] * config.num_speculative_tokens
        self.accepted = [0] * config.num_speculative_tokens
        self.depth = speculative.DepthController(config.num_speculative_tokens, config.speculative_adapt)
        self._held_depth = 0

    # ---- requests ----
    def new_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    snapshot_at: tuple[int, ...] = (), shared_at: tuple[int, ...] = ()) -> Request:
        """A checked request, not yet queued (raises ValueError / PromptTooLong). Reads only the
        configuration, so any thread may call it. shared_at: points of snapshot_at (or more) whose
        state other prompts share, kept as "shared" (never thinned)."""
        params.validate()
        inside = {p for p in (*snapshot_at, *shared_at) if 0 < p < len(prompt_ids)}
        req = Request(request_id or uuid.uuid4().hex, list(prompt_ids), params, snapshot_at=tuple(sorted(inside)),
                      shared_at=tuple(sorted(p for p in set(shared_at) if p in inside)))
        self.scheduler.check(req)
        return req

    def enqueue(self, req: Request) -> None:
        """Queues a request from `new_request`."""
        if req.id in self.requests:
            raise ValueError(f"request id {req.id!r} is already in use")
        if self.prefix_cache.enabled:
            # Where the prompt leaves a cached path, a state is worth keeping: the next prompt
            # sharing that prefix (another conversation after the same system prompt and tools)
            # resumes there instead of at the last checkpoint before it.
            # And a checkpoint at the last block boundary before the prompt's end (a chunk may
            # run past it): a prompt that leaves this one near its end resumes there.
            shared = self.prefix_cache.match(req.prompt_ids)
            resumable = self.prefix_cache.resumable(req.prompt_ids)
            last_block = (req.num_prompt - 1) // self.prefix_cache.block_size * self.prefix_cache.block_size
            extra = {p for p in (last_block,) if p > max(resumable, shared)}
            if resumable < shared < req.num_prompt:
                extra.add(shared)
                req.shared_at = tuple(sorted({*req.shared_at, shared}))
            req.snapshot_at = tuple(sorted({*req.snapshot_at, *extra}))
        self.scheduler.add(req)  # raises QueueFull
        self.requests[req.id] = req
        self._outputs[req.id] = _Output(self.tokenizer, self._hidden_ids, req.params.stop)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
            snapshot_at: tuple[int, ...] = (), shared_at: tuple[int, ...] = ()) -> Request:
        req = self.new_request(prompt_ids, params, request_id, snapshot_at, shared_at)
        self.enqueue(req)
        return req

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """Takes effect at the start of the next step (within one step). reason "stop": the
        reader decided the output is complete (a stop sequence it matches itself)."""
        if request_id in self.requests:
            self._cancelled.setdefault(request_id, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._cancelled)

    def warm_up(self, prompt_ids: list[int], processors: list = ()) -> None:
        """Runs `prompt_ids` through each kind of step before any request comes, so that MLX builds
        its kernels now: it compiles a fused kernel per input layout on first use (the CPU backend
        runs a C++ compiler for each, seconds apiece). The kinds: one row alone (prefill, decode),
        rows that start together (a right-padded batched prefill, then a batched decode; their
        kernels differ from one row's), and a row whose `processors` pick its tokens on the host.
        Meant for an engine that has served nothing yet: afterwards its prefix cache is empty (its
        counters at zero) and the step count is back where it was, so later answers and stats do
        not depend on the warm-up having run."""
        if self.requests:
            raise RuntimeError("warm up before serving: requests are in flight")
        width = min(2, self.config.max_num_seqs, self.config.max_queue)
        # Rows prefill as one batch only when all of them fit one step's prefill budget. 32 tokens
        # still take the chunked prefill form (gated_delta uses it from 16), and are quick.
        short = prompt_ids[: max(1, min(32, self.config.prefill_tokens_per_step // width))]
        rounds = [[(prompt_ids, [])]]
        if width > 1:
            rounds.append([(short, [])] * width)
        if processors:
            rounds.append([(short, list(processors))])
        steps, disk = self.steps, self.disk
        self.disk = None  # the warm-up's prompts neither hit nor stay on disk
        try:
            for rows in rounds:
                for ids, procs in rows:
                    self.add(ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, seed=0,
                                                 logits_processors=procs))
                while self.has_work():
                    self.step()
                self.prefix_cache.clear()  # the next round's rows must prefill from nothing, as new prompts do
        except BaseException:
            self.fail_all("warm-up failed")
            self.prefix_cache.clear()
            raise
        finally:
            self.steps, self.disk = steps, disk

    # ---- the step ----
    def step(self) -> None:
        """Errors in one request's own work (its seed, logits processors, penalties, first-token
        sampling, prefill forward, detokenizing, its stream) end that request alone, with
        finish_reason "error"; its neighbours' tokens do not depend on it. What still raises
        (the batched decode forward, the batch cache) leaves no way to tell whose it was: the
        engine thread then ends every request in flight (Engine._loop)."""
        self._apply_cancellations()
        plan = self.scheduler.schedule()
        new_tokens: list[tuple[Request, int, object]] = []
        failed: dict[str, Exception] = {}
        finished: list[Request] = []

        # speculative decoding: the depth the controller picks; at 0, a plain step (decode-ahead
        # allowed), which also ends a step launched ahead before drafting resumes
        drafting = self.runner.speculative and plan.decode and self.runner.rows
        depth = (self._held_depth or self.depth.choose(len(self.runner.rows))) if drafting else 0
        # A depth chosen while a step launched ahead is pending waits one step (this one ends the
        # pending step without launching another): choosing again would mostly pick the best depth,
        # and a retried depth would never run.
        self._held_depth = depth if depth and self.runner.pending is not None else 0
        if plan.decode and depth and self.runner.pending is None:
            finished += self._decode_speculative(failed, depth)
        elif plan.decode and self.runner.rows:
            start = time.perf_counter()
            reqs = [self.requests[r] for r in self.runner.rows]
            if self.runner.pending is not None:  # launched last step, already fed
                chosen, logits = self.runner.take_pending()
            else:
                logits = self.runner.decode(mx.array([r.output_ids[-1] for r in reqs]))
                chosen = self.sampler.choose(logits, reqs, failed)
                for req in reqs:
                    req.num_computed += 1
            if self._can_decode_ahead(plan, reqs) and not depth:
                ahead = self.runner.decode(chosen)
                self.runner.pending = (self.sampler.choose(ahead, reqs, failed), ahead)
                mx.async_eval(*self.runner.pending)
                for req in reqs:
                    req.num_computed += 1
            tokens, logprobs = self.sampler.read(chosen, logits, reqs)
            new_tokens += zip(reqs, tokens, logprobs)
            if self.runner.speculative:
                self.depth.record(len(reqs), 0, len(reqs), time.perf_counter() - start)

        for req, entry in plan.admitted:
            snapshot, hit_logits = self._restore(req, entry)
            self.runner.start(req.id, snapshot)
            try:
                self.sampler.add(req)
                if not req.prefilling:  # full hit: the entry carries the next-token logits
                    new_tokens.append(self._first_token(req, hit_logits))
            except Exception as e:
                failed[req.id] = e

        # a disk hit moves an admitted request past the point its planned chunk started from
        chunks = [(req, min(n, req.num_prompt - req.num_computed)) for req, n in plan.prefill if req.id not in failed]
        chunks = [(req, n) for req, n in chunks if n > 0]
        outs = self.runner.prefill([(req.id, req.prompt_ids[req.num_computed : req.num_computed + n])
                                    for req, n in chunks])
        for (req, n), logits in zip(chunks, outs):
            if isinstance(logits, Exception):
                failed[req.id] = logits
                continue
            try:
                req.num_computed += n
                done = not req.prefilling
                at_cut = req.num_computed % self.prefix_cache.block_size == 0
                asked = req.num_computed in req.snapshot_at and not at_cut
                if self.prefix_cache.enabled and (done or asked or at_cut):
                    kind = ("shared" if req.num_computed in req.shared_at else "pin" if asked
                            else "end" if done else "block")
                    self._remember(req, req.prompt_ids[: req.num_computed], logits if done else None, kind)
                if done:
                    new_tokens.append(self._first_token(req, logits))
            except Exception as e:
                failed[req.id] = e

        for req, tok, lp in new_tokens:
            if req.id in failed:
                continue
            try:
                if self._append(req, tok, lp):
                    finished.append(req)
            except Exception as e:
                failed[req.id] = e
        self._retire([r for r in finished if r.id not in failed], remember=True)
        self._fail(failed)
        self.steps += 1

    def _fail(self, failed: dict[str, Exception]) -> None:
        """End each request whose own work raised, with finish_reason "error"."""
        reqs = [self.requests[r] for r in failed if r in self.requests]
        for req in reqs:
            log.error("request %s failed in the engine step: %s: %s", req.id, type(failed[req.id]).__name__,
                      failed[req.id], exc_info=failed[req.id])
            req.finish_reason = "error"
            try:
                self.emit(Delta(req.id, [], "", finish_reason="error", usage=self._usage(req)))
            except Exception:  # its stream is the problem: the request ends all the same
                log.exception("request %s: its last delta could not be delivered", req.id)
        self._retire(reqs, remember=False)

    def _decode_speculative(self, failed: dict[str, Exception], depth: int) -> list[Request]:
        """One speculative decode step: the MTP head drafts, one forward verifies every row, each row
        appends its emitted tokens one by one (stop strings, EOS, max_tokens, streaming as in plain
        decoding; tokens after a stop are dropped) and keeps the state of what it appended.
        Constrained rows (logits processors) do not draft: verifying drafts through a grammar would
        need its state advanced per draft and rolled back. Returns the finished requests."""
        start = time.perf_counter()
        reqs = [self.requests[r] for r in self.runner.rows]
        last = [r.output_ids[-1] for r in reqs]
        limit = self.scheduler.config.max_model_len
        remaining = [min(r.params.max_tokens - len(r.output_ids), limit - r.num_prompt - len(r.output_ids))
                     for r in reqs]
        k = speculative.draft_depths(depth, remaining, [not r.params.logits_processors for r in reqs])
        drafted, k = self.runner.draft(last, k)
        logits = self.runner.verify(last, drafted, k)
        mx.async_eval(logits)  # the verify forward runs on while the host reads the drafts
        drafts = [d[:n] for d, n in zip(drafted.tolist(), k)] if drafted is not None else [[] for _ in reqs]
        finished, kept = [], []
        for req, d, (tokens, logprobs) in zip(reqs, drafts, self.sampler.accept(logits, reqs, drafts, failed)):
            for j in range(len(d)):
                self.drafted[j] += 1
                self.accepted[j] += j < len(tokens) - 1
            n = 0
            for tok, lp in zip(tokens, logprobs):
                n += 1
                try:
                    if self._append(req, tok, lp):
                        finished.append(req)
                        break
                except Exception as e:
                    failed[req.id] = e
                    break
            kept.append(max(n, 1))  # emitted token j came from fed position j
            req.num_computed += kept[-1]
        self.runner.commit(kept, [[t] + d for t, d in zip(last, drafts)])
        if drafted is not None:
            self.depth.record(len(reqs), depth, sum(kept), time.perf_counter() - start)
        else:  # no row could draft yet (the head had no input: plain steps before): it can next step
            self._held_depth = depth
        return finished

    def _can_decode_ahead(self, plan, reqs: list[Request]) -> bool:
        """Not when rows join the batch this step (they would miss the step launched ahead), nor when
        choosing a token needs the previous ones on the host (penalties, logits processors)."""
        return (self.config.decode_ahead and not plan.admitted and not any(n > 0 for _, n in plan.prefill)
                and not self.sampler.needs_history(reqs))

    def _first_token(self, req: Request, logits) -> tuple[Request, int, object]:
        tokens, logprobs = self.sampler(logits[None], [req])
        self.runner.join(req.id)
        req.first_token_time = time.monotonic()
        return req, tokens[0], logprobs[0]

    def _remember(self, req: Request, tokens: list[int], logits, kind: str = "end") -> None:
        """Keep the request's state after `tokens` (all it has fed), with only the KV of the
        positions the cache lacks."""
        if self.prefix_cache.contains(tokens) and logits is None and kind not in ("pin", "shared"):
            return
        start = self.prefix_cache.match(tokens)
        kv, state = segments.from_snapshot(self.runner.snapshot(req.id, kv_from=start), start)
        if logits is not None:
            logits = mx.array(logits)
            mx.eval(logits)
        if self.prefix_cache.insert(tokens, kv, state, logits, kind) and self.disk is not None and kind != "block":
            self._put_on_disk(tokens, self.prefix_cache.entry_at(tokens))

    def _restore(self, req: Request, entry: Entry | None):
        """The cache a request starts from and the logits at its end: the memory hit's, or the
        disk's where that goes deeper (then kept in memory too)."""
        types = self._layer_types
        depth = entry.depth if entry is not None else 0
        on_disk = self.disk.lookup(req.prompt_ids) if self.disk is not None and depth < req.num_prompt else 0
        if on_disk > depth:
            depth = on_disk
            loaded = self.disk.load(req.prompt_ids, depth)
            if loaded is not None:
                kv, state, logits = loaded
                segment = segments.KVSegment(kv, depth)
                state = segments.State([LinearLayer(conv, recurrent) for conv, recurrent in state])
                tokens = req.prompt_ids[:depth]
                if self.prefix_cache.enabled:
                    start = self.prefix_cache.match(tokens)
                    self.prefix_cache.insert(tokens, segment.slice(start, depth), state, logits)
                req.num_computed = req.num_cached = depth
                return segments.assemble(types, [segment], state, depth), logits
        if entry is None:
            return None, None
        return segments.assemble(types, entry.segments, entry.state, entry.depth), entry.logits

    def _put_on_disk(self, tokens: list[int], entry: Entry | None) -> None:
        """Queue the state at the end of tokens for the disk, with the KV the disk lacks."""
        start = self.disk.kv_covered(tokens)
        if entry is None or start >= len(tokens):
            return
        kv = segments.kv_range(entry.segments, start, len(tokens))
        mx.eval(kv)
        self.disk.put(tokens, start, kv, [(layer.conv, layer.state) for layer in entry.state.layers], entry.logits)

    def _evicted(self, tokens: list[int], entry: Entry) -> None:
        if self.disk is not None:
            self._put_on_disk(tokens, entry)

    def close(self) -> None:
        """At shutdown: the disk tier finishes its queued writes."""
        if self.disk is not None:
            self.disk.close()

    def _append(self, req: Request, token: int, logprob) -> bool:
        """Record a sampled token and emit its delta; returns True when the request is done."""
        p = req.params
        req.output_ids.append(token)
        out = self._outputs[req.id]
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        text, reason = "", None
        if stop_token:
            reason = "stop"
        else:
            piece = out.detok.add(token) if out.detok else ""
            text, hit = out.stops.feed(piece)
            if hit:
                reason = "stop"
        if reason is None and (len(req.output_ids) >= p.max_tokens
                               or req.num_prompt + len(req.output_ids) >= self.scheduler.config.max_model_len):
            reason = "length"
        if reason == "length" or (reason == "stop" and stop_token):
            tail = out.detok.flush() if out.detok else ""
            more, hit = out.stops.feed(tail)
            text += more + ("" if hit else out.stops.flush())
        delta = Delta(req.id, [] if stop_token else [token], text, [logprob] if logprob else [])
        if reason:
            req.finish_reason = reason
            delta.finish_reason = reason
            delta.usage = self._usage(req)
        self.emit(delta)
        return reason is not None

    def _usage(self, req: Request) -> Usage:
        return Usage(req.num_prompt, len(req.output_ids), req.num_cached)

    def _retire(self, reqs: list[Request], remember: bool) -> None:
        if not reqs:
            return
        for req in reqs:
            if remember and self.prefix_cache.enabled and req.id in self.runner.rows:
                # the state covers everything fed so far: the prompt and the output but its last
                # token (or all of it when a step was launched ahead)
                fed = req.all_ids[: req.num_computed]
                if not self.prefix_cache.contains(fed):
                    self._remember(req, fed, None, "gen")
        self.runner.release({r.id for r in reqs})
        for req in reqs:
            self.scheduler.finish(req, req.finish_reason or "stop")
            self.sampler.remove(req.id)
            self.requests.pop(req.id, None)
            self._outputs.pop(req.id, None)

    def _apply_cancellations(self) -> None:
        if not self._cancelled:
            return
        reasons = {r: why for r, why in self._cancelled.items() if r in self.requests}
        reqs = [self.requests[r] for r in reasons]
        self._cancelled.clear()
        for req in reqs:
            req.finish_reason = reasons[req.id]
            self.emit(Delta(req.id, [], "", finish_reason=req.finish_reason, usage=self._usage(req)))
        self._retire(reqs, remember=False)

    def fail_all(self, message: str) -> None:
        """After an unexpected error: end every request with finish_reason "error"."""
        reqs = list(self.requests.values())
        for req in reqs:
            req.finish_reason = "error"
            self.emit(Delta(req.id, [], "", finish_reason="error", usage=self._usage(req)))
        self.runner.clear()
        for req in reqs:
            self.scheduler.finish(req, "error")
            self.sampler.remove(req.id)
        self.requests.clear()
        self._outputs.clear()

    def idle(self) -> None:
        """No work left: hand the allocator's spare buffers back to the system."""
        mx.clear_cache()

    def stats(self) -> dict:
        disk = {"prefix_cache_disk": self.disk.stats()} if self.disk is not None else {}
        return {**self.scheduler.stats(), "prefix_cache": self.prefix_cache.stats(), **disk, "steps": self.steps,
                "model_bytes": self.model_bytes, "sequence_bytes": self.runner.live_bytes(),
                **({"speculative": {"drafted": self.drafted, "accepted": self.accepted}} if self.drafted else {})}
