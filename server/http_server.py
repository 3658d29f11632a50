"""uvicorn, with what `deltaserve serve` needs beyond uvicorn.run: a header timeout and a drain.

Header timeout: uvicorn (h11 or httptools) has none; a connection that sends half a request line
stays open for ever, so a few hundred of them hold the server's sockets. Here each connection must
finish its request headers within `header_timeout_s` of connecting (or of its last response).

Shutdown: uvicorn.run re-raises the SIGTERM/SIGINT it handled once it has stopped, which ends the
process (143) before the engine is shut down, and sse-starlette cancels every stream at the signal,
so a client sees a bare EOF. Here a signal stops the listener, the running requests go on for up to
`shutdown_timeout_s`, then the engine is shut down, which ends whatever still runs with an error
(each route's own final event: an error chunk and [DONE], Anthropic's error event, response.failed);
`serve` returns and the caller exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import uvicorn
from sse_starlette.sse import AppStatus
from uvicorn.protocols.http.auto import AutoHTTPProtocol

# after the drain, the time the ended streams get to send their last events
_FLUSH_S = 5.0


def header_timeout_protocol(timeout_s: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not complete
    `timeout_s` after it opened or after its last response (a request in progress is left alone)."""

    class HeaderTimeout(base):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request is running
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


class DrainingServer(uvicorn.Server):
    """engine: shut down once the drain is over (and by the caller after serve returns)."""

    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without raising the signal again at the end."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self.force_exit:  # a second Ctrl-C: end the running requests now
            threading.Thread(target=self.engine.shutdown, daemon=True).start()

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        end_the_rest = loop.call_later(self.shutdown_timeout_s,
                                       lambda: loop.run_in_executor(None, self.engine.shutdown))
        try:
            await super().shutdown(sockets)
        finally:
            end_the_rest.cancel()


def uvicorn_config(app, settings) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="off",
        http=header_timeout_protocol(settings.header_timeout_s), timeout_keep_alive=settings.keep_alive_timeout_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.shutdown_timeout_s + _FLUSH_S)


def serve(app, settings, engine) -> None:
    """Runs until SIGTERM/SIGINT and the drain after it."""
    # The streams end through the engine (above); sse-starlette's own drain would cut them at the signal.
    AppStatus.disable_automatic_graceful_drain()
    DrainingServer(uvicorn_config(app, settings), engine, settings.shutdown_timeout_s).run()
