"""A deltaserve app on a real socket (uvicorn in a background thread) for the openai client, and the
small references engine tests compare against."""

from __future__ import annotations

import functools
import socket
import threading
import time

import uvicorn


class ServerThread:
    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@functools.cache
def tiny_model():
    """The fixture model and tokenizer, loaded once per test session (fp32: exact greedy paths)."""
    from fixtures import get_fixture

    from model import load

    return load(get_fixture("moe_r4").hf_dir, dtype="float32")


def tiny_engine(**config):
    from server.engine import Engine, EngineConfig

    model, tok = tiny_model()
    defaults = dict(max_num_seqs=4, max_model_len=512, memory_budget_bytes=1 << 30, prefix_cache_bytes=32 << 20,
                    prefill_tokens_per_step=256, block_size=32)
    return Engine(model, tok, EngineConfig(**{**defaults, **config}))


def tiny_app(engine, **settings):
    from server.app import create_app
    from server.settings import Settings

    defaults = dict(served_model_names=["tiny"], enable_auto_tool_choice=True, max_tokens=16)
    return create_app(Settings(**{**defaults, **settings}), engine)


def wait_until(predicate, timeout=10.0, interval=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class ModelSpy:
    """The model, recording the token shape of every forward."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, tokens, *args, **kwargs):
        self.shapes.append(tuple(tokens.shape))
        return self.model(tokens, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def solo_greedy(model, tokens: list[int], n: int):
    """The model alone on one sequence (a plain batch-1 cache, no engine): its greedy tokens and the
    logits each was chosen from, what a request must produce whatever runs beside it."""
    import mlx.core as mx
    import numpy as np

    cache = model.make_cache(1)
    logits = model(mx.array(tokens)[None], cache, last_only=True)[0, -1]
    out, seen = [], []
    for _ in range(n):
        seen.append(np.array(logits))
        out.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([out[-1]])[None], cache)[0, -1]
    return out, seen


def drive(core, reqs, arrive=None) -> list[list]:
    """Steps an EngineCore until it is done, adding reqs[i] = (prompt ids, SamplingParams) at step
    arrive[i] (default: all at once); returns each request's deltas, in reqs' order."""
    events = {}
    core.emit = lambda d: events.setdefault(d.request_id, []).append(d)
    arrive = arrive or [0] * len(reqs)
    order = sorted(range(len(reqs)), key=lambda i: arrive[i])
    ids, step = {}, 0
    while order or core.has_work():
        while order and arrive[order[0]] <= step:
            i = order.pop(0)
            ids[i] = core.add(reqs[i][0], reqs[i][1]).id
        core.step()
        step += 1
    return [events[ids[i]] for i in range(len(reqs))]
