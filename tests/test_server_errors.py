"""Refusals in OpenAI's error envelope, API keys, and cancellation when a client goes away."""

import json

import httpx
import openai
import pytest
from server_harness import ServerThread, tiny_app, wait_until

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def keyed(engine):
    with ServerThread(tiny_app(engine, api_key=KEY, enable_auto_tool_choice=False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(server, body, path="/v1/chat/completions", **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=kw.pop("timeout", 30), **kw)


def error_of(resp, status=400):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


HI = [{"role": "user", "content": "Hi"}]


def test_malformed_json(server):
    err = error_of(post(server, '{"model": "tiny", "messages": ['))
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]


def test_body_must_be_an_object(server):
    assert "JSON object" in error_of(post(server, "[1, 2]"))["message"]


def test_missing_messages(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=None)  # type: ignore[arg-type]
    assert e.value.body["param"] == "messages" and "messages" in e.value.body["message"]


def test_empty_messages(server):
    assert error_of(post(server, {"model": "tiny", "messages": []}))["param"] == "messages"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:  # 404, as OpenAI answers
        client.chat.completions.create(model="gpt-9", messages=HI)
    assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


def test_context_too_long(client):
    long = [{"role": "user", "content": "word " * 700}]  # the test engine's context is 512 tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long)
    assert e.value.body["code"] == "context_length_exceeded"


def test_max_tokens_past_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("patch,param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"stop": ["a"] * 40}, "stop"),
    ({"n": 2}, "n"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_wrong_types_and_impossible_values_name_the_field(server, patch, param):
    err = error_of(post(server, {"model": "tiny", "messages": HI, **patch}))
    if param is not None:
        assert err["param"] == param, err
        assert param.split("[")[0] in err["message"]


def test_unknown_fields_are_tolerated(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, user="someone",
                                       extra_body={"some_vendor_flag": {"x": 1}, "metadata": {"k": "v"}})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unknown_route_and_method(server):
    assert error_of(httpx.get(server.base_url + "/v1/nothing"), 404)["type"] == "not_found_error"
    error_of(httpx.get(server.base_url + "/v1/chat/completions"), 405)


def test_auto_tool_choice_off(keyed):
    """--no-enable-auto-tool-choice: vLLM's behaviour without its flag."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    err = error_of(post(keyed, {"model": "tiny", "messages": HI, "tools": tools},
                        headers={"authorization": f"Bearer {KEY}"}))
    assert "--no-enable-auto-tool-choice" in err["message"] and err["param"] == "tool_choice"


def test_api_key(keyed):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        err = error_of(httpx.get(keyed.base_url + "/v1/models", headers=headers), 401)
        assert err["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=HI, max_tokens=1).usage.completion_tokens == 1
    assert httpx.get(keyed.base_url + "/health").status_code == 200


def running(engine):
    s = engine.stats()
    return s["running"] + s["waiting"]


def test_disconnect_mid_stream_frees_the_slot(client, engine):
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 4:
            break
    assert running(engine) == 1
    stream.close()
    # 400 tokens take seconds on this model; cancellation must come long before that
    assert wait_until(lambda: running(engine) == 0, timeout=1.5)


def cancelled_count(server) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    line = 'deltaserve_requests_total{endpoint="chat",finish_reason="cancelled"}'
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))


def test_disconnected_requests_are_counted_as_cancelled(server, client, engine):
    before = cancelled_count(server)
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert wait_until(lambda: cancelled_count(server) == before + 1, timeout=5)


def test_disconnect_while_waiting_for_a_whole_response_frees_the_slot(server, engine):
    body = {"model": "tiny", "messages": HI, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, body, timeout=0.5)
    assert wait_until(lambda: running(engine) == 0, timeout=1.5)
