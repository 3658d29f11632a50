"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) driven by the real anthropic
SDK against the embedded demo model on a real socket, greedy. Response bodies and stream events are
validated against the SDK's own pydantic types; prompt lengths are checked against transformers'
rendering of the equivalent chat, so the translation is judged by code that is not ours.

The anthropic SDK 2.17 no longer takes temperature as an argument: it goes in extra_body."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter
from server_harness import ServerThread

from demo.tools import TOOLS
from model.demo import DEMO_GGUF

KEY = "test-key"
GREEDY = {"extra_body": {"temperature": 0}}
CITY = "Lisbon"
QUESTION = f"What's the weather in {CITY}?"
RESULT = {"city": CITY, "temperature": 23, "unit": "celsius", "condition": "sunny"}
SMALL_TALK = "Hello! How are you?"


def _anthropic_tool(name: str) -> dict:
    fn = TOOLS[name].definition()["function"]
    return {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}


TOOLS_OFFERED = [_anthropic_tool("get_weather"), _anthropic_tool("get_time")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from convert import cached_conversion
    from model import load
    from server.app import create_app
    from server.engine import Engine
    from server.settings import Settings

    path = cached_conversion(DEMO_GGUF, cache_root=tmp_path_factory.mktemp("converted"))
    model, tokenizer = load(path)
    settings = Settings(served_model_names=["demo"], api_key=KEY, max_num_seqs=4,
                        memory_budget_bytes=2 << 30, prefix_cache_bytes=256 << 20)
    engine = Engine(model, tokenizer, settings.engine_config())
    try:
        with ServerThread(create_app(settings, engine)) as server:
            yield server, path
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf_tokenizer(served):
    """transformers' tokenizer of the served checkpoint, to render prompts independently of us."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served[1])


def _create(client, **kwargs) -> Message:
    """messages.create, with the raw body validated against the SDK's Message type."""
    raw = client.messages.with_raw_response.create(model="demo", max_tokens=kwargs.pop("max_tokens", 200),
                                                   **GREEDY, **kwargs)
    return Message.model_validate(raw.http_response.json())


def _events(server, body: dict, headers: dict | None = None, params: dict | None = None) -> list[tuple[str, dict]]:
    """A streamed request read as raw SSE: (event name, data) in order, pings included."""
    events, name = [], None
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json={"model": "demo", "stream": True, **body},
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", **(headers or {})},
                      params=params, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def _check_sequence(events: list[tuple[str, dict]]) -> None:
    """Anthropic's order: message_start; per block content_block_start, its deltas (of its kind, at its
    index), content_block_stop, with one ping after the first block starts; message_delta; message_stop.
    Every event but ping is one of the SDK's RawMessageStreamEvent."""
    adapter = TypeAdapter(RawMessageStreamEvent)
    names = [n for n, _ in events]
    for name, data in events:
        assert data["type"] == name
        if name != "ping":
            adapter.validate_python(data)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "ping" in names  # (more come every 15 s on a slow stream)
    body = [e for e in events[1:-2] if e[0] != "ping"]
    first = names.index("content_block_start") if "content_block_start" in names else len(names) - 3
    assert names[first + 1] == "ping"  # where Anthropic's first ping is
    kinds = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}
    index, kind = -1, None
    for name, data in body:
        if name == "content_block_start":
            assert kind is None and data["index"] == index + 1
            index, kind = data["index"], data["content_block"]["type"]
        elif name == "content_block_delta":
            assert data["index"] == index and data["delta"]["type"] == kinds[kind]
        else:
            assert name == "content_block_stop" and data["index"] == index and kind is not None
            kind = None
    assert kind is None


def _text(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def _rendered_length(hf_tokenizer, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> int:
    """The prompt's tokens as transformers renders the equivalent chat with the checkpoint's template."""
    fn_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in tools or []]
    prompt = hf_tokenizer.apply_chat_template(messages, tools=fn_tools or None, add_generation_prompt=True,
                                              tokenize=False, **kwargs)
    return len(hf_tokenizer.encode(prompt, add_special_tokens=False))


# ---------------------------------------------------------------- create and stream

def test_create_answers_with_thinking_and_text_and_anthropic_usage(client, hf_tokenizer):
    m = _create(client, messages=[{"role": "user", "content": SMALL_TALK}])
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "demo"
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking.strip() and m.content[0].signature == ""
    assert _text(m).strip() and m.stop_reason == "end_turn" and m.stop_sequence is None
    u = m.usage
    prompt = _rendered_length(hf_tokenizer, [{"role": "user", "content": SMALL_TALK}])
    assert u.input_tokens + u.cache_read_input_tokens == prompt and u.cache_creation_input_tokens == 0
    assert u.output_tokens > 0


def test_stream_follows_anthropics_event_sequence_and_adds_up_to_create(client, served):
    body = {"max_tokens": 200, "temperature": 0, "messages": [{"role": "user", "content": SMALL_TALK}]}
    events = _events(served[0], body)
    _check_sequence(events)
    assert events[0][1]["message"]["stop_reason"] is None
    with client.messages.stream(model="demo", max_tokens=200, messages=body["messages"], **GREEDY) as stream:
        final = stream.get_final_message()
    whole = _create(client, messages=body["messages"])
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason == events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens


# ---------------------------------------------------------------- tools

@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_tool_use_round_trip(client, stream, hf_tokenizer):
    """get_weather for Lisbon -> the tool's result -> an answer with the temperature; the second turn
    resumes from the prefix cache."""
    def ask(messages):
        if not stream:
            return _create(client, messages=messages, tools=TOOLS_OFFERED)
        with client.messages.stream(model="demo", max_tokens=200, messages=messages, tools=TOOLS_OFFERED,
                                    **GREEDY) as s:
            deltas = [e.delta.type for e in s if e.type == "content_block_delta"]
            m = s.get_final_message()
        if any(b.type == "tool_use" for b in m.content):
            assert "input_json_delta" in deltas
        return m

    first = ask([{"role": "user", "content": QUESTION}])
    assert first.stop_reason == "tool_use"
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name == "get_weather" and call.input == {"city": CITY}
    jsonschema.validate(call.input, TOOLS_OFFERED[0]["input_schema"])

    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": json.dumps(RESULT)}]}]
    second = ask(history)
    assert second.stop_reason == "end_turn" and not any(b.type == "tool_use" for b in second.content)
    assert str(RESULT["temperature"]) in _text(second)
    assert second.usage.cache_read_input_tokens > 0
    chat = [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "", "reasoning_content": first.content[0].thinking,
             "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.input}}]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(RESULT)}]
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == _rendered_length(
        hf_tokenizer, chat, TOOLS_OFFERED)


def test_tool_choice_maps_onto_chats(client):
    """tool: that tool is called even for small talk (arguments fit its schema); none: no call even
    for the weather question; any: some offered tool is called, once with disable_parallel_tool_use."""
    m = _create(client, messages=[{"role": "user", "content": SMALL_TALK}], tools=TOOLS_OFFERED,
                tool_choice={"type": "tool", "name": "get_time"})
    (call,) = [b for b in m.content if b.type == "tool_use"]
    assert call.name == "get_time" and m.stop_reason == "tool_use"
    jsonschema.validate(call.input, TOOLS_OFFERED[1]["input_schema"])

    m = _create(client, messages=[{"role": "user", "content": QUESTION}], tools=TOOLS_OFFERED,
                tool_choice={"type": "none"})
    assert not any(b.type == "tool_use" for b in m.content) and m.stop_reason == "end_turn"

    m = _create(client, messages=[{"role": "user", "content": SMALL_TALK}], tools=TOOLS_OFFERED,
                tool_choice={"type": "any", "disable_parallel_tool_use": True})
    calls = [b for b in m.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name in ("get_weather", "get_time") and m.stop_reason == "tool_use"


def test_tool_result_error_and_blocks_reach_the_prompt(client, hf_tokenizer):
    """A tool_result given as text blocks with is_error reads 'Error: ...' to the model, as the
    equivalent chat's tool message would."""
    history = [{"role": "user", "content": QUESTION},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"city": CITY}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                             "content": [{"type": "text", "text": "service "},
                                                         {"type": "text", "text": "unavailable"}]}]}]
    n = client.messages.count_tokens(model="demo", messages=history, tools=TOOLS_OFFERED).input_tokens
    chat = [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "toolu_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": {"city": CITY}}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: service unavailable"}]
    assert n == _rendered_length(hf_tokenizer, chat, TOOLS_OFFERED)


# ---------------------------------------------------------------- count_tokens, thinking, stops, limits

def test_count_tokens_is_the_rendered_prompt(client, hf_tokenizer):
    system = [{"type": "text", "text": "You are terse. ", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Answer in English."}]
    messages = [{"role": "user", "content": [{"type": "text", "text": SMALL_TALK}]}]
    count = client.messages.count_tokens(model="demo", system=system, messages=messages, tools=TOOLS_OFFERED)
    assert isinstance(count, MessageTokensCount)
    chat = [{"role": "system", "content": "You are terse. Answer in English."}, {"role": "user", "content": SMALL_TALK}]
    assert count.input_tokens == _rendered_length(hf_tokenizer, chat, TOOLS_OFFERED)


def test_thinking_switch(client, hf_tokenizer):
    messages = [{"role": "user", "content": SMALL_TALK}]
    on = _create(client, messages=messages, thinking={"type": "enabled", "budget_tokens": 1024})
    off = _create(client, messages=messages, thinking={"type": "disabled"})
    assert on.content[0].type == "thinking" and on.content[0].thinking.strip()
    assert [b.type for b in off.content] == ["text"] and _text(off).strip()
    assert off.usage.input_tokens + off.usage.cache_read_input_tokens == _rendered_length(
        hf_tokenizer, messages, enable_thinking=False)
    # reasoning given back as a thinking block is the assistant turn's reasoning_content
    history = [*messages, {"role": "assistant", "content": on.content}, {"role": "user", "content": "And you?"}]
    chat = [*messages, {"role": "assistant", "content": _text(on), "reasoning_content": on.content[0].thinking},
            {"role": "user", "content": "And you?"}]
    assert client.messages.count_tokens(model="demo", messages=history).input_tokens == _rendered_length(
        hf_tokenizer, chat)


@pytest.mark.parametrize("lead", ["", " "], ids=["word", "space-word"])
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_stop_sequence(client, stream, lead):
    messages = [{"role": "user", "content": SMALL_TALK}]
    free = _text(_create(client, messages=messages, thinking={"type": "disabled"}))
    word, later = lead + free.split()[1], free.split()[-1]
    assert free.index(later) > free.index(word)
    # the one that ends the answer is the first in the text, not in the list
    kwargs = dict(messages=messages, thinking={"type": "disabled"}, stop_sequences=[later, "no such text", word])
    if stream:
        with client.messages.stream(model="demo", max_tokens=200, **kwargs, **GREEDY) as s:
            m = s.get_final_message()
    else:
        m = _create(client, **kwargs)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert _text(m).strip() == free[:free.index(word)].strip()


def test_max_tokens(client):
    m = _create(client, messages=[{"role": "user", "content": SMALL_TALK}], max_tokens=5)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5


def test_second_turn_reads_the_prefix_cache(client):
    first = [{"role": "user", "content": SMALL_TALK}]
    reply = _create(client, messages=first)
    history = [*first, {"role": "assistant", "content": reply.content}, {"role": "user", "content": "Tell me a joke."}]
    second = _create(client, messages=history)
    assert second.usage.cache_read_input_tokens > 0
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == client.messages.count_tokens(
        model="demo", messages=history).input_tokens


# ---------------------------------------------------------------- authentication and errors

def test_api_key_by_x_api_key_or_bearer_on_every_route(served):
    server, _ = served
    messages = [{"role": "user", "content": SMALL_TALK}]
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model="demo", max_tokens=4, messages=messages)
    assert e.value.status_code == 401 and e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token=KEY, max_retries=0)
    assert bearer.messages.count_tokens(model="demo", messages=messages).input_tokens > 0

    chat = {"model": "demo", "max_tokens": 2, "messages": messages}
    url = f"{server.base_url}/v1/chat/completions"
    assert httpx.post(url, json=chat, headers={"x-api-key": KEY}, timeout=60).status_code == 200
    r = httpx.post(url, json=chat, headers={"x-api-key": "wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"  # OpenAI's shape there
    assert httpx.get(f"{server.base_url}/v1/models", headers={"x-api-key": KEY}).status_code == 200


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"max_tokens": 8, "messages": []}, 400, "messages"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}, 400, "messages.0.role"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     400, "reads text only"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     400, "messages.0.content.0.tool_use_id"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS_OFFERED,
      "tool_choice": {"type": "tool", "name": "nope"}}, 400, "nope"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {"type": "object"}}]},
     400, "web_search_20250305"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]},
     400, "prefill"),
    ({"max_tokens": 8, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]}, 400, "temperature"),
    ({"max_tokens": 8, "model": "claude-nope", "messages": [{"role": "user", "content": "hi"}]},
     404, "claude-nope"),
]


@pytest.mark.parametrize("body,status,names", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_input_gets_anthropics_error_shape(served, body, status, names, stream):
    server, _ = served
    r = httpx.post(f"{server.base_url}/v1/messages", json={"model": "demo", "stream": stream, **body},
                   headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"type", "error"} and err["type"] == "error"
    assert err["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert names in err["error"]["message"]


def test_errors_reach_the_sdk_as_its_exceptions(client, served):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="demo", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{served[0].base_url}/v1/messages", content=b"{not json",
                   headers={"x-api-key": KEY, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{served[0].base_url}/v1/messages/count_tokens", json={"model": "demo", "messages": "hi"},
                   headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["type"] == "error" and "messages" in r.json()["error"]["message"]


def test_a_claude_code_shaped_request(served):
    """What Claude Code sends: ?beta=true, anthropic-beta, system blocks with cache_control, metadata,
    tool schemas with $schema and additionalProperties, thinking, output_config.effort, a stream."""
    tool = _anthropic_tool("get_weather")
    tool["input_schema"] = {**tool["input_schema"], "$schema": "http://json-schema.org/draft-07/schema#",
                            "additionalProperties": False}
    body = {"max_tokens": 200, "temperature": 0, "metadata": {"user_id": "user_abc_session_1"},
            "system": [{"type": "text", "text": "You are a helpful assistant.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION,
                                                       "cache_control": {"type": "ephemeral"}}]}],
            "tools": [{**tool, "cache_control": {"type": "ephemeral"}}],
            "thinking": {"type": "enabled", "budget_tokens": 4096}, "output_config": {"effort": "high"}}
    server, _ = served
    events = _events(server, body, headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
                     params={"beta": "true"})
    _check_sequence(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "tool_use"] and starts[1]["name"] == "get_weather"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_stopped_engine_is_overloaded(served):
    """Anthropic's shape for the engine's refusals too: a stopped engine answers 503 overloaded_error."""
    from model import load
    from server.app import create_app
    from server.engine import Engine
    from server.settings import Settings

    model, tokenizer = load(served[1])
    settings = Settings(served_model_names=["demo"], memory_budget_bytes=1 << 30)
    engine = Engine(model, tokenizer, settings.engine_config())
    engine.shutdown()
    with ServerThread(create_app(settings, engine)) as server:
        r = httpx.post(f"{server.base_url}/v1/messages", timeout=60,
                       json={"model": "demo", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "overloaded_error"
