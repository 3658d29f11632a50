"""Memory that cannot take the machine down: the wired-memory limit decided from device info
(Metal's numbers faked here: this machine has no Metal), a request that can never fit refused with
a 400 naming the numbers on every API, and one that fits later waiting for room."""

import logging

import httpx
import mlx.core as mx
import pytest
from server_harness import ServerThread, solo_greedy, tiny_app, tiny_engine, tiny_model

from model.cache import kv_capacity
from server import wired_memory
from server.engine import EngineConfig, EngineCore, SamplingParams
from server.engine.runner import Runner
from server.wired_memory import plan, set_wired_limit

GB = 1 << 30
METAL = {"architecture": "applegpu_g15s", "memory_size": 128 * GB, "max_recommended_working_set_size": 96 * GB}


def test_plan_covers_model_and_budget_within_metals_recommendation():
    assert plan(20 * GB, 40 * GB, METAL) == (60 * GB, None)
    limit, warning = plan(30 * GB, 80 * GB, METAL)  # together past the recommended working set
    assert limit == 96 * GB and "--memory-budget" in warning and "98304 MB" in warning
    limit, warning = plan(90 * GB, 1 * GB, METAL)  # the model alone is close to it (mlx-lm's 90% rule)
    assert limit == 96 * GB and "92160 MB" in warning


@pytest.mark.parametrize("info", [{"architecture": "x86_64", "device_name": "Intel(R) Xeon(R)"}, {}])
def test_plan_leaves_backends_without_a_working_set_alone(info):
    assert plan(20 * GB, 40 * GB, info) == (None, None)


def test_set_wired_limit_on_metal_sets_it_and_elsewhere_only_logs(monkeypatch, caplog):
    model, _ = tiny_model()
    model_bytes = sum(a.nbytes for a in _leaves(model.parameters()))
    calls = []
    monkeypatch.setattr(wired_memory.mx, "set_wired_limit", lambda n: calls.append(n) or 0)

    monkeypatch.setattr(wired_memory.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(wired_memory.mx, "device_info", lambda: {"device_name": "cpu", "architecture": "x86_64"})
    with caplog.at_level(logging.DEBUG, logger="deltaserve"):
        assert set_wired_limit(model, 1 * GB) is None
    assert calls == [] and "no wired-memory limit" in caplog.text

    monkeypatch.setattr(wired_memory.mx, "device_info", lambda: METAL)
    monkeypatch.setattr(wired_memory.mx.metal, "is_available", lambda: False)  # e.g. CUDA reporting such a size
    assert set_wired_limit(model, 1 * GB) is None and calls == []
    monkeypatch.setattr(wired_memory.mx.metal, "is_available", lambda: True)
    assert set_wired_limit(model, 1 * GB) == model_bytes + GB
    assert calls == [model_bytes + GB]


def test_this_machines_backend_is_left_alone(monkeypatch):
    monkeypatch.setattr(wired_memory.mx, "set_wired_limit", lambda n: pytest.fail("set on a CPU backend"))
    if mx.metal.is_available():
        pytest.skip("a Metal machine: the limit is set there")
    assert set_wired_limit(tiny_model()[0], 1 * GB) is None


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [a for _, a in tree_flatten(tree)]


def _budget_for(tokens):
    """Scheduler bytes for one sequence of `tokens`, from the runner's per-token and per-sequence sizes."""
    runner = Runner(tiny_model()[0])
    return runner.state_bytes_per_seq() + runner.kv_bytes_per_token() * kv_capacity(tokens)


@pytest.fixture(scope="module")
def small_server():
    budget = _budget_for(200)
    engine = tiny_engine(memory_budget_bytes=budget, prefix_cache_bytes=0)
    with ServerThread(tiny_app(engine)) as srv:
        yield srv, budget
    engine.shutdown()


REQUESTS = {
    "/v1/chat/completions": lambda n: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": n},
    "/v1/completions": lambda n: {"model": "tiny", "prompt": "hi", "max_tokens": n},
    "/v1/messages": lambda n: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": n},
    "/v1/responses": lambda n: {"model": "tiny", "input": "hi", "max_output_tokens": n},
}


@pytest.mark.parametrize("path", list(REQUESTS))
def test_a_request_that_can_never_fit_is_a_400_naming_the_numbers(small_server, path):
    srv, budget = small_server
    r = httpx.post(srv.base_url + path, json=REQUESTS[path](400), timeout=30)
    assert r.status_code == 400, r.text
    body = r.json()
    error = body["error"]
    if path == "/v1/messages":
        assert body["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
    assert f"memory budget of {budget}" in error["message"] and "max_tokens" in error["message"]
    assert httpx.post(srv.base_url + path, json=REQUESTS[path](4), timeout=30).status_code == 200


def test_a_request_that_fits_later_waits_for_room_then_runs():
    model, tok = tiny_model()
    prompts = [list(range(200, 240)), list(range(300, 350))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    core = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=_budget_for(64)))
    out = {}
    core.emit = lambda d: out.setdefault(d.request_id, []).extend(d.token_ids)
    ids = [core.add(p, params).id for p in prompts]  # each fits alone, not both at once
    core.step()
    assert [r.id for r in core.scheduler.running] == ids[:1] and [r.id for r in core.scheduler.waiting] == ids[1:]
    while core.has_work():
        assert len(core.scheduler.running) <= 1
        core.step()
    assert [out[i] for i in ids] == [solo_greedy(model, p, 6)[0] for p in prompts]
