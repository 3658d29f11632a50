"""The engine on its own thread, with a small API for the HTTP layer:
`submit(prompt_ids, params) -> Stream` (iterate it, sync or async, for deltas) and `cancel(id)`."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from .core import EngineConfig, EngineCore
from .request import Delta, EngineStopped, SamplingParams

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
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.core = EngineCore(model, tokenizer, config, emit=self._emit)
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._error: str | None = None
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
               snapshot_at: tuple[int, ...] = ()) -> Stream:
        """Raises ValueError, QueueFull or PromptTooLong at once if the request cannot run.
        snapshot_at: prompt offsets worth a prefix-cache snapshot (where a chat's history ends)."""
        if self._stop or self._error:
            raise EngineStopped(self._error or "the engine is shutting down")
        with self._lock:
            req = self.core.add(prompt_ids, params, request_id, snapshot_at)
            stream = Stream(self, req.id)
            self._streams[req.id] = stream
        self._wake.set()
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.core.cancel(request_id)
        self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            return self.core.stats()

    def _emit(self, delta: Delta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None:
            return
        if delta.finish_reason is not None:
            del self._streams[delta.request_id]
        stream._put(delta)

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.core.has_work()
                if busy:
                    try:
                        self.core.step()
                    except Exception:
                        log.exception("engine step failed; ending the requests in flight")
                        self.core.fail_all("internal error")
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            self.core.fail_all("shutdown")
