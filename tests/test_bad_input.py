"""Bad input that once reached a 500 (and closed the keep-alive connection): each gets a 4xx in
the route's own error shape, OpenAI's on /v1/chat/completions, /v1/completions and /v1/responses,
Anthropic's on /v1/messages. Sampling parameters at their extremes cannot break the sampler, and
a grammar-constrained request still follows its grammar."""

import json

import httpx
import pytest

HI = [{"role": "user", "content": "Hi"}]
NEEDS_A_CALL = {"tool_choice": "required", "messages": HI}


def post(server, body, path="/v1/chat/completions"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ensure_ascii: "\ud800" stays escaped
    return httpx.post(server.base_url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60)


def openai_error(resp, status=400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


def anthropic_error(resp, status=400) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    return body["error"]


def tool(name="get_weather", **parameters):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], **parameters}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


DEEP = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_deeply_nested_json(server, path):
    assert "nested" in openai_error(post(server, DEEP, path))["message"]


def test_deeply_nested_json_on_messages(server):
    assert "nested" in anthropic_error(post(server, DEEP, "/v1/messages"))["message"]


def test_nan_is_not_json(server):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}'
    assert "NaN" in openai_error(post(server, body))["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a\ud800"}]}),
    ("/v1/completions", {"model": "tiny", "prompt": "a\ud800"}),
    ("/v1/responses", {"model": "tiny", "input": "a\ud800"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "stop": ["\udc00"]}),
])
def test_lone_surrogate(server, path, body):
    assert "surrogate" in openai_error(post(server, body, path))["message"]


def test_lone_surrogate_on_messages(server):
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "a\ud800"}]}
    assert "surrogate" in anthropic_error(post(server, body, "/v1/messages"))["message"]


def test_a_surrogate_pair_is_text(server):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "a\U0001F600"}]}
    assert post(server, body).status_code == 200


@pytest.mark.parametrize("key", ["²", "100000000000000000000", "-1", " 5", "151936"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_keys_that_are_not_token_ids(server, key, path):
    body = {"model": "tiny", "max_tokens": 2, "logit_bias": {key: 5}}
    body.update({"messages": HI} if "chat" in path else {"prompt": "Hi"})
    assert openai_error(post(server, body, path))["param"] == "logit_bias"


@pytest.mark.parametrize("parameters,what", [
    ({"properties": ["city"]}, "properties"),
    ({"required": 5}, "required"),
    ({"required": [5]}, "required"),
    ({"properties": {"city": "string"}}, "properties"),
])
def test_tool_schema_our_code_reads(server, parameters, what):
    err = openai_error(post(server, {"model": "tiny", **NEEDS_A_CALL, "tools": [tool(**parameters)]}))
    assert err["param"] == "tools[0].function.parameters" and what in err["message"]


@pytest.mark.parametrize("name", ['a"\n>', "", "x" * 65, "get weather", "f<tool_call>"])
def test_tool_names_as_openai_requires(server, name):
    err = openai_error(post(server, {"model": "tiny", **NEEDS_A_CALL, "tools": [tool(name)]}))
    assert err["param"] == "tools[0].function.name"


def test_tool_names_on_messages_and_responses(server):
    body = {"model": "tiny", "max_tokens": 4, "messages": HI, "tool_choice": {"type": "any"},
            "tools": [{"name": 'a"\n>', "input_schema": {"type": "object"}}]}
    assert "name" in anthropic_error(post(server, body, "/v1/messages"))["message"]
    body = {"model": "tiny", "input": "Hi", "tool_choice": "required",
            "tools": [{"type": "function", "name": 'a"\n>', "parameters": {"type": "object"}}]}
    assert "name" in openai_error(post(server, body, "/v1/responses"))["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("kind", [["text"], {"a": 1}, 5])
def test_a_block_type_that_is_not_a_string(server, path, kind):
    """Found by tests/test_fuzz.py: a list as a block's type reached the union's discriminator (TypeError)."""
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": kind, "text": "Hi"}]}]}
    assert "messages.0.content.0.type" in anthropic_error(post(server, body, path))["message"]


def test_a_valid_tool_name_with_dots_and_dashes(server):
    short = tool("weather.get-now_v2", properties={"city": {"type": "string", "maxLength": 3}})
    r = post(server, {"model": "tiny", **NEEDS_A_CALL, "max_tokens": 60, "tools": [short],
                      "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "weather.get-now_v2"


@pytest.mark.parametrize("kwargs", [{"namespace": 1}, {"raise_exception": 1}, {"continue_final_message": True},
                                    {"messages": []}, {"bos_token": "x"}, {"range": 3}, {"tojson": 1}])
def test_template_kwargs_that_replace_the_templates_own_names(server, kwargs):
    err = openai_error(post(server, {"model": "tiny", "messages": HI, "chat_template_kwargs": kwargs}))
    assert err["param"] == "chat_template_kwargs" and next(iter(kwargs)) in err["message"]


def test_template_kwargs_the_template_reads_still_work(server):
    r = post(server, {"model": "tiny", "messages": HI, "max_tokens": 2,
                      "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("patch", [
    {"repetition_penalty": 1e-300}, {"repetition_penalty": 0.001}, {"repetition_penalty": 11},
    {"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**31}, {"logit_bias": {"5": 1e300}},
])
def test_sampling_values_outside_their_ranges(server, patch):
    assert openai_error(post(server, {"model": "tiny", "messages": HI, **patch}))["param"] == next(iter(patch))


def text_of(resp) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def test_negative_seeds_are_reduced_modulo_2_to_the_64(server):
    base = {"model": "tiny", "messages": HI, "max_tokens": 8, "temperature": 1.5}
    assert text_of(post(server, {**base, "seed": -1})) == text_of(post(server, {**base, "seed": 2**64 - 1}))
    assert text_of(post(server, {**base, "seed": -(2**63)})) == text_of(post(server, {**base, "seed": 2**63}))


EXTREMES = [
    {"temperature": 1e-300},
    {"temperature": 1e-300, "repetition_penalty": 0.01, "top_p": 1e-300},
    {"temperature": 2.0, "top_p": 1e-300, "min_p": 1.0, "frequency_penalty": -2, "presence_penalty": -2},
    {"temperature": 1e-300, "logit_bias": {str(i): 100 for i in range(50, 80)}},
]


@pytest.mark.parametrize("extreme", EXTREMES)
def test_extreme_sampling_keeps_a_schema(server, extreme):
    """A schema with one short answer: whatever the sampling, the output is that JSON, whole."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    body = {"model": "tiny", "messages": HI, "max_tokens": 30, "response_format": fmt, "seed": 1,
            "chat_template_kwargs": {"enable_thinking": False}, **extreme}
    r = post(server, body)
    answer = json.loads(text_of(r))
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extreme", EXTREMES)
def test_extreme_sampling_keeps_json_object(server, extreme):
    body = {"model": "tiny", "messages": HI, "max_tokens": 24, "response_format": {"type": "json_object"},
            "seed": 2, "chat_template_kwargs": {"enable_thinking": False}, **extreme}
    r = post(server, body)
    text = text_of(r)
    assert text.startswith("{"), text
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


def test_the_connection_survives_bad_input(server):
    """A 4xx keeps the keep-alive connection: the client's next pooled request goes through."""
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for body in (DEEP, json.dumps({"model": "tiny", "prompt": "a\ud800"}).encode()):
            r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.headers.get("connection") != "close"
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200


def test_one_failing_stream_leaves_its_neighbour_alone(server, monkeypatch):
    """A request whose own work raises mid-stream (its logit_bias processor, made to fail here)
    gets an error event and [DONE]; a stream generating beside it gets exactly its solo text."""
    import threading

    import server.serving as serving

    class FailingBias:
        def __init__(self, bias):
            pass

        def __call__(self, generated, logits):
            if len(generated) >= 3:
                raise RuntimeError("injected failure")
            return logits

    def stream(body) -> list[dict]:
        events = []
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
        return events

    def text(events) -> str:
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))

    good = {"model": "tiny", "messages": HI, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    solo = stream(good)
    monkeypatch.setattr(serving, "LogitBias", FailingBias)
    results = {}
    neighbour = threading.Thread(target=lambda: results.setdefault("good", stream(good)))
    neighbour.start()
    failing = stream({**good, "logit_bias": {"5": 1}})
    neighbour.join()
    assert failing[-1] == "[DONE]" and "error" in failing[-2]
    assert text(results["good"]) == text(solo) and results["good"][-1] == "[DONE]"
    assert results["good"][-2]["choices"][0]["finish_reason"] == "length"
