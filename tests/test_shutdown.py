"""SIGTERM to `deltaserve serve`: the listener closes, a running stream finishes (or, past
--shutdown-timeout, is ended with an error event), every stream ends with [DONE], and the
process exits 0 (uvicorn alone re-raises the signal: 143, and sse-starlette cuts streams at once)."""

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from fixtures import get_fixture
from fixtures.ports import free_port
from server_harness import wait_until
from test_server_cli import cli, wait_healthy


def serve(*flags):
    port = free_port()
    proc = cli("serve", str(get_fixture("moe_r4").hf_dir), "--port", str(port), "--served-model-name", "tiny",
               "--max-model-len", "2048", "--dtype", "float32", "--log-level", "warning", *flags)
    if not wait_healthy(proc, port):
        proc.kill()
        pytest.fail(proc.communicate()[0])
    return proc, port


class Stream(threading.Thread):
    """A streamed request on its own thread: its SSE data lines, and when the first arrived."""

    def __init__(self, port: int, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = f"http://127.0.0.1:{port}{path}", body
        self.lines: list[str] = []
        self.first = threading.Event()
        self.error = None

    def run(self):
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line[6:])
                        self.first.set()
        except httpx.HTTPError as e:  # a bare EOF mid-stream
            self.error = e
        self.first.set()

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.lines if x != "[DONE]"]


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def stop(proc, stream: Stream, timeout: float = 60):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    stream.join(timeout=10)
    return out


def test_sigterm_lets_a_running_stream_finish_and_exits_0():
    proc, port = serve()  # the default drain: 30 s
    try:
        s = Stream(port, "/v1/completions", {"prompt": "Once", "max_tokens": 40, "ignore_eos": True, "stream": True})
        s.start()
        assert s.first.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: refuses_connections(port), timeout=10)  # the listener closes at once
        out, _ = proc.communicate(timeout=60)
        s.join(timeout=10)
    finally:
        proc.kill()
    assert s.error is None and s.lines[-1] == "[DONE]", s.lines[-3:]
    events = s.events()
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1
    assert proc.returncode == 0, out


def test_past_the_shutdown_timeout_a_stream_is_ended_with_an_error_and_done():
    proc, port = serve("--shutdown-timeout", "1")
    try:
        chat = Stream(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 1500, "ignore_eos": True, "stream": True})
        msgs = Stream(port, "/v1/messages", {"model": "tiny", "max_tokens": 1500, "stream": True,
                                             "messages": [{"role": "user", "content": "Hi"}]})
        chat.start()
        msgs.start()
        assert chat.first.wait(60) and msgs.first.wait(60)
        started = time.monotonic()
        out = stop(proc, chat)
        msgs.join(timeout=10)
        took = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert took < 15, took  # 1 s of drain, not the 1500 tokens
    assert chat.error is None and chat.lines[-1] == "[DONE]", chat.lines[-3:]
    last = chat.events()[-1]
    assert "error" in last or last["choices"][0]["finish_reason"] is not None, last
    assert msgs.error is None
    assert msgs.events()[-1]["type"] in ("error", "message_stop"), msgs.lines[-2:]
