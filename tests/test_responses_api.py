"""/v1/responses (OpenAI Responses) on the demo model, through the real client libraries on a real
socket: the openai SDK (create, stream, function-call round trip, previous_response_id, GET and
DELETE, json_schema), openai-agents with its default (Responses) model and a function tool,
LangChain's ChatOpenAI(use_responses_api=True), and the prefix cache across turns. Every event and
response is also validated against the openai SDK's own pydantic types, the spec we serve."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from pydantic import TypeAdapter
from test_demo_e2e import serve_demo

from demo.tools import TOOLS

CITY = "Lisbon"
QUESTION = f"What's the weather in {CITY}?"
RESULT = {"city": CITY, "temperature": 23, "unit": "celsius", "condition": "sunny"}
CHAT_TOOLS = [TOOLS["get_weather"].definition(), TOOLS["get_time"].definition()]
TOOLS_OFFERED = [{"type": "function", **t["function"]} for t in CHAT_TOOLS]  # the Responses form
ASK = dict(model="demo", temperature=0, max_output_tokens=200)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """`deltaserve serve` on the demo GGUF (prefix cache on, as by default)."""
    with serve_demo(tmp_path_factory) as c:
        yield c


@pytest.fixture(scope="module")
def base_url(client):
    return str(client.base_url).rstrip("/")


def _valid_response(client, **kwargs):
    """A create() whose raw JSON must validate as the SDK's Response (constructing skips checks)."""
    from openai.types.responses import Response

    raw = client.responses.with_raw_response.create(**kwargs)
    return Response.model_validate(raw.http_response.json())


def _items(response) -> list[dict]:
    return [item.model_dump(exclude_none=True) for item in response.output]


def _calls(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


def _tool_output(call) -> dict:
    return {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(RESULT)}


# ---------------------------------------------------------------- create

def test_create_answers_with_reasoning_item_and_usage(client):
    r = _valid_response(client, input="Hello! How are you?", **ASK)
    assert r.status == "completed" and r.object == "response" and r.model == "demo"
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"], kinds
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text.strip()
    assert r.output_text.strip()
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens


def test_create_is_the_chat_completions_path(client):
    """The same conversation through chat completions gives the same reasoning and call: one path."""
    r = _valid_response(client, input=QUESTION, tools=TOOLS_OFFERED, **ASK)
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUESTION}],
                                          tools=CHAT_TOOLS, temperature=0, max_tokens=200)
    msg = chat.choices[0].message
    (call,) = _calls(r)
    (chat_call,) = msg.tool_calls
    assert (call.name, call.arguments) == (chat_call.function.name, chat_call.function.arguments)
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text == msg.reasoning_content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens


def test_instructions_and_reasoning_effort_none(client):
    # a string input longer than the item limit is still one item
    r = _valid_response(client, input="Hello! How are you?" + " " * 5000, instructions="You are a helpful assistant.",
                        reasoning={"effort": "none"}, **ASK)
    assert [item.type for item in r.output] == ["message"]
    assert r.output_text.strip() and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "You are a helpful assistant." and r.reasoning.effort == "none"


def test_max_output_tokens_makes_it_incomplete(client):
    r = _valid_response(client, model="demo", input="Hello! How are you?", temperature=0, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[-1].status == "incomplete"


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = _valid_response(client, input=f"Is it sunny in {CITY}? Answer in JSON.", reasoning={"effort": "none"},
                        text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}},
                        **ASK)
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)


# ---------------------------------------------------------------- tools and conversation state

def test_function_call_round_trip_by_previous_response_id(client):
    first = _valid_response(client, input=QUESTION, tools=TOOLS_OFFERED, **ASK)
    (call,) = _calls(first)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": CITY}
    assert call.call_id and call.status == "completed"
    second = _valid_response(client, previous_response_id=first.id, input=[_tool_output(call)], tools=TOOLS_OFFERED,
                             **ASK)
    assert second.previous_response_id == first.id and not _calls(second)
    assert str(RESULT["temperature"]) in second.output_text
    # the first turn's prompt and output are in the prefix cache: the second turn starts from them
    assert second.usage.input_tokens_details.cached_tokens > 0


def test_function_call_round_trip_by_resending_history(client):
    first = _valid_response(client, input=QUESTION, tools=TOOLS_OFFERED, store=False, **ASK)
    (call,) = _calls(first)
    history = [{"type": "message", "role": "user", "content": QUESTION}, *_items(first), _tool_output(call)]
    second = _valid_response(client, input=history, tools=TOOLS_OFFERED, store=False, **ASK)
    assert str(RESULT["temperature"]) in second.output_text
    assert second.usage.input_tokens_details.cached_tokens > 0


def test_parallel_tool_calls_false_keeps_one_call(client):
    question = f"What's the weather in {CITY} and in Paris?"
    both = client.responses.create(input=question, tools=TOOLS_OFFERED, store=False, **ASK)
    assert [json.loads(c.arguments)["city"] for c in _calls(both)] == [CITY, "Paris"]  # what the model does
    one = client.responses.create(input=question, tools=TOOLS_OFFERED, parallel_tool_calls=False, store=False, **ASK)
    assert one.status == "completed" and one.parallel_tool_calls is False
    assert [json.loads(c.arguments)["city"] for c in _calls(one)] == [CITY]
    assert one.usage.output_tokens < both.usage.output_tokens  # the generation stopped at the first call
    events = list(client.responses.create(input=question, tools=TOOLS_OFFERED, parallel_tool_calls=False,
                                          store=False, stream=True, **ASK))
    streamed = _check_events(events)
    assert [c.arguments for c in _calls(streamed)] == [c.arguments for c in _calls(one)]


def test_retrieve_delete_and_not_stored(client):
    import openai

    r = client.responses.create(input="Hello!", **ASK)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == "completed"
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(previous_response_id=r.id, input="And you?", **ASK)
    unstored = client.responses.create(input="Hello!", store=False, **ASK)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(previous_response_id="resp_unknown", input="Hi", **ASK)
    assert e.value.body["param"] == "previous_response_id"


# ---------------------------------------------------------------- streaming

def _check_events(events: list) -> dict:
    """Sequence numbers, the documented order, deltas adding up to each done; -> the final response."""
    from openai.types.responses import ResponseStreamEvent

    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e.model_dump(exclude_unset=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert events[0].response.status == "in_progress" and not events[0].response.output
    final = events[-1].response
    open_item, text, done_items = None, "", []  # items stream one at a time, each added ... done
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert open_item is None and e.output_index == len(done_items)
            open_item, text = e.item, ""
        elif e.type.endswith(".delta"):
            assert e.item_id == open_item.id and e.output_index == len(done_items)
            text += e.delta
        elif e.type in ("response.output_text.done", "response.reasoning_text.done"):
            assert e.text == text
        elif e.type == "response.function_call_arguments.done":
            assert e.arguments == text
        elif e.type == "response.output_item.done":
            assert e.item.id == open_item.id and e.item.status == "completed"
            done_items.append(e.item)
            open_item = None
    assert open_item is None
    # the stream helper's final items add parsed_arguments (its own parse of the arguments)
    assert [i.model_dump() for i in done_items] == [i.model_dump(exclude={"parsed_arguments"}) for i in final.output]
    expected = {"message": ["content_part.added", "output_text.delta", "output_text.done", "content_part.done"],
                "reasoning": ["content_part.added", "reasoning_text.delta", "reasoning_text.done", "content_part.done"],
                "function_call": ["function_call_arguments.delta", "function_call_arguments.done"]}
    for item in final.output:
        own = [e.type.removeprefix("response.") for e in events if getattr(e, "item_id", None) == item.id]
        deduped = [k for j, k in enumerate(own) if j == 0 or k != own[j - 1]]  # deltas repeat
        assert deduped == expected[item.type], (item.type, own)
    return final


def test_stream_function_call_and_answer(client):
    with client.responses.stream(input=QUESTION, tools=TOOLS_OFFERED, **ASK) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert _check_events(events).id == final.id
    (call,) = _calls(final)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": CITY}
    whole = client.responses.create(input=QUESTION, tools=TOOLS_OFFERED, store=False, **ASK)
    assert [(i.type, i.model_dump().get("arguments")) for i in whole.output] == \
        [(i.type, i.model_dump().get("arguments")) for i in final.output]
    events = list(client.responses.create(previous_response_id=final.id, input=[_tool_output(call)],
                                          tools=TOOLS_OFFERED, stream=True, **ASK))
    answer = _check_events(events)
    assert str(RESULT["temperature"]) in answer.output_text
    assert answer.usage.input_tokens_details.cached_tokens > 0


def test_stream_incomplete(client):
    events = list(client.responses.create(model="demo", input="Hello!", temperature=0, max_output_tokens=3,
                                          stream=True))
    assert events[-1].type == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


# ---------------------------------------------------------------- bad input: 4xx in OpenAI's shape

@pytest.mark.parametrize("tool", ["web_search", "web_search_preview", "file_search", "computer_use_preview",
                                  "code_interpreter", "image_generation", "mcp"])
def test_built_in_tools_are_refused_by_name(client, tool):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input="Hi", tools=[{"type": tool}], **ASK)
    assert repr(tool) in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, words", [
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input_image"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
    ({"input": [{"type": "function_call", "name": "get_weather", "arguments": "{}"}]}, "call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{"},
                {"type": "function_call_output", "call_id": "c", "output": "{}"}]}, "JSON"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
    ({"input": "Hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS_OFFERED}, "nope"),
    ({"input": "Hi", "tool_choice": {"type": "allowed_tools"}}, "allowed_tools"),
    ({"input": "Hi", "tools": [{"type": "function"}]}, "name"),
    ({"input": [{"role": "user", "content": "Hi"}] * 4097}, "4096"),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "conversation": "conv_1"}, "conversation"),
])
def test_bad_input_is_a_400_naming_it(base_url, body, words):
    import httpx

    r = httpx.post(f"{base_url}/responses", json={"model": "demo", **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error


def test_unknown_model_and_bad_json(base_url):
    import httpx

    r = httpx.post(f"{base_url}/responses", json={"model": "nope", "input": "Hi"}, timeout=60)
    assert 400 <= r.status_code < 500 and "nope" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/responses", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# ---------------------------------------------------------------- other client libraries

def test_openai_agents_default_model_with_a_function_tool(base_url):
    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_api,
                        set_default_openai_client, set_tracing_disabled)
    from openai import AsyncOpenAI

    asked = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        asked.append(city)
        return json.dumps(RESULT)

    set_tracing_disabled(True)
    set_default_openai_api("responses")
    set_default_openai_client(AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0), use_for_tracing=False)
    agent = Agent(name="weather", model="demo", tools=[get_weather],
                  model_settings=ModelSettings(temperature=0, max_tokens=200))
    result = asyncio.run(Runner.run(agent, QUESTION, max_turns=4))
    assert asked == [CITY]
    assert str(RESULT["temperature"]) in result.final_output


def test_langchain_chat_openai_responses_api(base_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="demo", base_url=base_url, api_key="none", use_responses_api=True, temperature=0,
                     max_tokens=200, max_retries=0)
    plain = llm.invoke("Hello! How are you?")
    assert plain.text.strip()
    question = HumanMessage(QUESTION)
    asked = llm.bind_tools(CHAT_TOOLS).invoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": CITY}
    answer = llm.bind_tools(CHAT_TOOLS).invoke([question, asked,
                                                ToolMessage(json.dumps(RESULT), tool_call_id=call["id"])])
    assert not answer.tool_calls and str(RESULT["temperature"]) in answer.text


# ---------------------------------------------------------------- the store and the fold, without a server

def test_store_keeps_the_most_recently_used_within_its_bytes():
    from server.openai_responses.store import ResponseStore, Stored

    def entry(name: str) -> Stored:
        return Stored({"id": name, "output": [{"type": "message", "content": "x" * 100}]},
                      [{"role": "user", "content": "y" * 100}])

    def size(s: Stored) -> int:
        return len(json.dumps([s.response, s.items], ensure_ascii=False).encode())

    a, b, c, d = map(entry, "abcd")
    store = ResponseStore(max_bytes=size(a) * 5 // 2)  # room for two
    for s in (a, b, c):
        store.put(s)
    assert store.get("a") is None and store.get("b") is b and store.get("c") is c
    store.get("b")  # b is now the most recently used: d pushes c out
    store.put(d)
    assert store.get("c") is None and store.get("b") is b and store.get("d") is d
    assert store.nbytes == size(b) + size(d)
    assert store.delete("b") and not store.delete("b") and store.nbytes == size(d)
    store.put(Stored({"id": "big", "output": [{"text": "z" * 10_000}]}, []))
    assert store.get("big") is None and store.get("d") is d
    assert b.conversation() == [*b.items, *b.response["output"]]


def test_an_engine_error_ends_the_stream_with_response_failed():
    from types import SimpleNamespace

    from openai.types.responses import ResponseStreamEvent

    from server.engine.request import Delta, Usage
    from server.openai_responses.fold import ResponseFold, base_response
    from server.openai_responses.protocol import ResponsesRequest
    from server.output import ChatOutputParser

    job = SimpleNamespace(created=0, model="demo", params=SimpleNamespace(temperature=0.0, top_p=1.0))
    parser = ChatOutputParser(reasoning=True, starts_in_reasoning=True, tools=None, parse_tools=False)

    def read(d):
        return parser.feed(d.text) + (parser.finish() if d.finish_reason else [])

    fold = ResponseFold(base_response(ResponsesRequest(input="Hi"), job, True), parser, read)
    events = fold.start() + fold.add(Delta("r", [1, 2, 3], "Let me think.</think>Hel"))
    events += fold.add(Delta("r", [], "", finish_reason="error", usage=Usage(5, 3)))
    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error"
    assert [(i["type"], i["status"]) for i in last["response"]["output"]] == [("reasoning", "completed"),
                                                                               ("message", "incomplete")]
    assert last["response"]["output"][1]["content"][0]["text"] == "Hel"
    assert last["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
