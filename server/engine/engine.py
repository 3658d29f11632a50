"""The engine on its own thread, with a small API for the HTTP layer:
`submit(prompt_ids, params) -> Stream` (iterate it, sync or async, for deltas), `cancel(id)` and `stop(id)`."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future

from .core import EngineConfig, EngineCore
from .request import Delta, EngineStopped, SamplingParams, Usage

log = logging.getLogger("deltaserve.engine")


class Stream:
    """Deltas of one request. Closing it (or leaving an `async for` early) cancels the request."""

    def __init__(self, engine: "Engine", request_id: str):
        self.engine = engine
        self.request_id = request_id
        self._queue: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        try:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        except RuntimeError:
            pass
        self.done = False

    def _put(self, delta: Delta) -> None:  # engine thread
        self._queue.put(delta)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    def __iter__(self):
        while not self.done:
            delta = self._queue.get()
            self.done = delta.finish_reason is not None
            yield delta

    def __aiter__(self):
        return self._agen()

    async def _agen(self):
        try:
            while not self.done:
                try:
                    delta = self._queue.get_nowait()
                except queue.Empty:
                    self._event.clear()
                    if self._queue.empty():
                        await self._event.wait()
                    continue
                self.done = delta.finish_reason is not None
                yield delta
        finally:
            if not self.done:
                self.close()

    def close(self) -> None:
        if not self.done:
            self.engine.cancel(self.request_id)


class Engine:
    """Owns the engine thread. Only that thread touches `core`: other threads hand it requests and
    cancellations through an inbox and read the stats it publishes after each step, so a submit,
    a cancel or a metrics scrape never waits for a model step (the HTTP event loop calls them)."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, lockstep=None):
        """lockstep: a server.distributed.Lockstep on rank 0 of a distributed serve: each drained inbox
        goes to the other ranks before it is applied, and a failure of theirs ends this engine."""
        self.lockstep = lockstep
        if lockstep is None:
            self.core = EngineCore(model, tokenizer, config, emit=self._emit)
        else:
            self.core = lockstep.make_core(model, tokenizer, config or EngineConfig(), emit=self._emit)
            self.core.watchdog = lockstep.watchdog
            lockstep.on_failure = self._abandon
        self.failure: str | None = None  # why a distributed engine stopped
        self._streams: dict[str, Stream] = {}  # whose readers are still listening
        self._live: set[str] = set()  # ids submitted and not yet finished, listened to or not
        # ("add", Request) | ("cancel" | "stop", request id) | ("warm_up", (prompt ids, processors, Future))
        self._inbox: list[tuple[str, object]] = []
        self._queued = 0  # adds in the inbox: they count against max_queue before they reach the scheduler
        self._lock = threading.Lock()  # guards the four above; never held over a step
        self._stats = self.core.stats()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deltaserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.scheduler.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.model.config.vocab_size

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               snapshot_at: tuple[int, ...] = (), shared_at: tuple[int, ...] = ()) -> Stream:
        """Raises ValueError, QueueFull, PromptTooLong or EngineStopped at once if the request cannot run.
        snapshot_at: prompt offsets worth a prefix-cache snapshot (where a chat's history ends);
        shared_at: offsets whose snapshot other conversations share (where the system prompt ends)."""
        req = self.core.new_request(prompt_ids, params, request_id, snapshot_at, shared_at)
        with self._lock:
            if self._stop:  # set before the loop's last drain, which takes this lock
                raise EngineStopped(self.failure or "the engine is shutting down")
            if req.id in self._live:
                raise ValueError(f"request id {req.id!r} is already in use")
            self.core.scheduler.check_room(self._queued)
            stream = Stream(self, req.id)
            self._streams[req.id] = stream
            self._live.add(req.id)
            self._inbox.append(("add", req))
            self._queued += 1
        self._wake.set()
        return stream

    def cancel(self, request_id: str) -> None:
        """Its stream gets nothing more (its reader has gone); the request ends at the next step."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._inbox.append(("cancel", request_id))
        self._wake.set()

    def stop(self, request_id: str) -> None:
        """Ends the request as a stop sequence would: its stream gets a last delta with
        finish_reason "stop" and the usage so far (the server matches chat stop sequences itself)."""
        with self._lock:
            self._inbox.append(("stop", request_id))
        self._wake.set()

    def warm_up(self, prompt_ids: list[int], processors: list = ()) -> None:
        """Runs EngineCore.warm_up on the engine thread and returns when it is done (raising what it
        raised). Meant for before serving: requests submitted meanwhile wait until it is over."""
        done: Future = Future()
        with self._lock:
            if self._stop:
                raise EngineStopped("the engine is shutting down")
            self._inbox.append(("warm_up", (list(prompt_ids), list(processors), done)))
        self._wake.set()
        done.result()

    def stats(self) -> dict:
        """As of the end of the engine's last step."""
        return self._stats

    def _emit(self, delta: Delta) -> None:  # engine thread
        with self._lock:
            if delta.finish_reason is None:
                stream = self._streams.get(delta.request_id)
            else:
                stream = self._streams.pop(delta.request_id, None)
                self._live.discard(delta.request_id)
        if stream is not None:
            stream._put(delta)

    def _drain(self) -> list:  # engine thread, before each step: also publishes the last step's stats
        """Takes in the inbox's requests and cancellations; returns its warm-ups, to run outside the lock."""
        warm_ups = []
        with self._lock:
            inbox, self._inbox = self._inbox, []
        if self.lockstep is not None:  # outside the lock: a collective may block until the watchdog fires
            self.lockstep.send(inbox, self.core)
        with self._lock:
            self._queued -= sum(kind == "add" for kind, _ in inbox)
            for kind, item in inbox:
                if kind == "add":
                    self.core.enqueue(item)  # submit checked its id and the room in the queue
                elif kind == "cancel":
                    self.core.cancel(item)
                elif kind == "stop":
                    self.core.cancel(item, "stop")
                else:
                    warm_ups.append(item)
            self._stats = self.core.stats()
        return warm_ups

    def _warm_up(self, prompt_ids: list[int], processors: list, done: Future) -> None:  # engine thread
        try:
            self.core.warm_up(prompt_ids, processors)
        except Exception as e:
            done.set_exception(e)
        else:
            done.set_result(None)

    def _loop(self) -> None:
        busy = False
        while not self._stop:
            try:
                warm_ups = self._drain()
            except Exception as e:  # only a distributed engine's send raises: a rank is gone
                self.lockstep.fail(f"{type(e).__name__}: {e}")
                return
            for warm_up in warm_ups:
                self._warm_up(*warm_up)
            if self.core.has_work():
                busy = True
                try:
                    self.core.step()
                except Exception as e:
                    if self.lockstep is not None:  # the ranks may no longer agree on what happened
                        log.exception("engine step failed")
                        self.lockstep.fail(f"engine step failed: {type(e).__name__}: {e}")
                        return
                    log.exception("engine step failed; ending the requests in flight")
                    self.core.fail_all("internal error")
            else:
                if busy:
                    self.core.idle()
                    busy = False
                self._wake.wait(0.05)
                self._wake.clear()
        if self.lockstep is not None:
            self.lockstep.close()  # before the last drain, which then stays on this rank
        for *_, done in self._drain():
            done.set_exception(EngineStopped("the engine is shutting down"))
        self.core.fail_all("shutdown")
        self.core.close()
        self._stats = self.core.stats()

    def _abandon(self, reason: str) -> None:  # any thread: the engine thread may be stuck in a collective
        """A distributed engine that cannot go on: no more requests, and each stream ends with an error."""
        with self._lock:
            self.failure = f"serving stopped: {reason}"
            self._stop = True
            streams, self._streams = list(self._streams.values()), {}
            self._live.clear()
        for stream in streams:
            req = self.core.requests.get(stream.request_id)
            usage = Usage(req.num_prompt, len(req.output_ids), req.num_cached) if req is not None else Usage(0, 0)
            stream._put(Delta(stream.request_id, [], "", finish_reason="error", usage=usage))
        self._wake.set()

    def shutdown(self) -> None:
        """Stops the loop; the requests in flight end (finish_reason "error") once the step in
        progress is done."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
