"""Ready means ready: a server started with warm-up answers 503 ("starting") on /health and the /v1
routes until its warm-up has run the engine through every kind of step and built the grammar
machinery, and afterwards answers as if it had never warmed up. References: the tokenizer's own
chat template (the warm-up prompt), llguidance (the tokens generated under the grammar) and
transformers (greedy output after the warm-up)."""

import json
import logging
import threading
import urllib.request
from types import SimpleNamespace

import httpx
import pytest
from fixtures import get_fixture
from server_harness import ModelSpy, ServerThread, tiny_engine, tiny_model, wait_until

from server.app import create_app
from server.constrained import GrammarProcessor
from server.settings import Settings
from server.warmup import MESSAGES, TOOL

SETTINGS = dict(served_model_names=["tiny"], max_tokens=16)


@pytest.fixture(scope="module")
def starting():
    """A server whose warm-up waits at the engine for `gate`."""
    engine = tiny_engine()
    log = ModelSpy(engine.core.runner.model)
    engine.core.runner.model = log
    gate, seen, warm_up = threading.Event(), {}, engine.warm_up

    def held(prompt_ids, processors=()):
        seen.update(prompt_ids=list(prompt_ids), processors=list(processors))
        assert gate.wait(60)
        warm_up(prompt_ids, processors)

    engine.warm_up = held
    app = create_app(Settings(**SETTINGS), engine, warm_up=True)
    with ServerThread(app) as srv:
        yield SimpleNamespace(srv=srv, app=app, engine=engine, gate=gate, seen=seen, log=log)
    gate.set()
    engine.shutdown()


@pytest.fixture(scope="module")
def ready(starting):
    starting.gate.set()
    assert starting.app.state.warm_up.ready.wait(120)
    starting.warm_shapes = list(starting.log.shapes)
    return starting


def get(srv, path):
    return httpx.get(srv.base_url + path, timeout=30)


def post_chat(srv, **body):
    return httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body},
                      timeout=60)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_starting_until_the_warm_up_is_over(starting):
    srv = starting.srv
    assert wait_until(lambda: "prompt_ids" in starting.seen)  # held inside the warm-up
    health = get(srv, "/health")
    assert (health.status_code, health.json()) == (503, {"status": "starting"})
    assert health.headers["retry-after"] == "1"
    for resp in (post_chat(srv, max_tokens=2), get(srv, "/v1/models")):
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        err = resp.json()["error"]
        assert (err["type"], err["code"]) == ("service_unavailable", "server_starting")
        assert "starting" in err["message"]
    assert get(srv, "/metrics").status_code == 200  # scrapes stay open
    assert starting.log.shapes == []  # the engine has not run yet

    starting.gate.set()
    assert wait_until(lambda: get(srv, "/health").status_code == 200, timeout=120)
    assert get(srv, "/health").json() == {"status": "ok"}


def test_warm_up_counts_nothing_and_leaves_no_state(ready):
    core = ready.engine.core
    assert core.steps == 0 and not core.requests and not core.runner.rows
    assert core.prefix_cache.stats()["entries"] == core.prefix_cache.stats()["lookups"] == 0
    text = get(ready.srv, "/metrics").text
    for name in ("deltaserve_requests_total", "deltaserve_prompt_tokens_total", "deltaserve_generation_tokens_total"):
        assert metric(text, name) == 0, name

    fx = get_fixture("moe_r4")
    r = httpx.post(ready.srv.base_url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": fx.prompt_ids.tolist(), "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    _, tok = tiny_model()
    assert r.json()["choices"][0]["text"] == tok.decode(fx.greedy_ids.tolist(), skip_special_tokens=True)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert metric(get(ready.srv, "/metrics").text, "deltaserve_requests_total") == 1


def test_warm_up_renders_a_chat_through_the_template(ready):
    _, tok = tiny_model()
    expected = tok.apply_chat_template(MESSAGES, tools=[TOOL], add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert ready.seen["prompt_ids"] == expected


def test_warm_up_ran_every_kind_of_step(ready):
    shapes = set(ready.warm_shapes)
    assert {(1, 1), (2, 1)} <= shapes  # decoding one row, and two rows together
    assert any(b == 1 and t > 1 for b, t in shapes)  # a prompt prefilled alone
    assert any(b == 2 and t > 1 for b, t in shapes)  # prompts prefilled as one batch


def test_warm_up_built_the_grammar_machinery(ready):
    assert ready.app.state.server.grammars._ll is not None  # llguidance's tokenizer
    [proc] = ready.seen["processors"]
    assert isinstance(proc, GrammarProcessor)
    # the warm-up's constrained row decoded under the tool-call grammar, and llguidance accepted every token
    assert proc.consumed >= 2 and not proc.failed and not proc.matcher.is_error()


def test_a_failed_warm_up_still_ends_in_ready(caplog):
    engine = tiny_engine(max_model_len=16)  # the warm-up chat does not fit
    try:
        with caplog.at_level(logging.WARNING, logger="deltaserve.warmup"):
            app = create_app(Settings(**SETTINGS), engine, warm_up=True)
            assert app.state.warm_up.ready.wait(60)
        assert "warm-up failed" in caplog.text
        with ServerThread(app) as srv:
            assert json.loads(urllib.request.urlopen(srv.base_url + "/health").read()) == {"status": "ok"}
    finally:
        engine.shutdown()
