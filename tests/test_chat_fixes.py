"""Chat-completions fixes that real client libraries needed (issue 31), each through the library
that hit it, against the demo model served by `deltaserve serve` (started without
--enable-auto-tool-choice: tool calling is on by default)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from demo.tools import TOOLS
from test_demo_e2e import serve_demo

WEATHER = TOOLS["get_weather"].definition()
TIME = TOOLS["get_time"].definition()
GREEDY = dict(model="demo", temperature=0, max_tokens=200)
QUESTION = "What's the weather in Lisbon?"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serve_demo(tmp_path_factory) as c:
        yield c


def _base_url(client) -> str:
    return str(client.base_url).rstrip("/")


# ---------------------------------------------------------------- system and developer messages

def test_pydantic_ai_instructions_and_system_prompt(client):
    """pydantic-ai sends its instructions and system prompt as two leading system messages."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=_base_url(client), api_key="none"))
    agent = Agent(model, instructions="Answer briefly.", system_prompt="You are a helpful assistant.",
                  model_settings={"temperature": 0, "max_tokens": 100})
    result = agent.run_sync("Hello!")
    assert isinstance(result.output, str) and result.output.strip()


def test_developer_message_and_later_system_message(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "system", "content": "The user is in Lisbon."},
                {"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(messages=messages, tools=[WEATHER], **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


# ---------------------------------------------------------------- stop sequences

def _answer(client, stream: bool, **kwargs) -> str:
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    if not stream:
        return client.chat.completions.create(messages=messages, **GREEDY, **kwargs).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(messages=messages, stream=True, **GREEDY, **kwargs) if c.choices)


def test_langchain_stop_applies_to_the_answer_not_the_reasoning(client):
    """ChatOpenAI(stop=["\\n\\n"]) got empty answers: the stop matched the blank lines after </think>."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="demo", base_url=_base_url(client), api_key="none", temperature=0, max_tokens=200,
                     use_responses_api=False, stop=["\n\n"])
    reply = llm.invoke("Hello! Who are you?")
    assert reply.content.strip() and "\n\n" not in reply.content
    assert reply.content == _answer(client, False).split("\n\n")[0]


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_stop_ends_the_content_where_the_stop_string_begins(client, stream):
    full = _answer(client, stream)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[len(words) // 2]
    expected = full[: full.index(stop)]
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hello! Who are you?"}], stop=[stop],
                                       **GREEDY)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200
    assert _answer(client, stream, stop=[stop]) == expected


# ---------------------------------------------------------------- tool calls

TWO_CITIES = "What's the weather in Lisbon and in Paris?"


def _strict(tool: dict) -> dict:
    return {"type": "function", "function": {**tool["function"], "strict": True}}


def _calls(client, stream: bool, tools=(WEATHER, TIME), **kwargs) -> tuple[list[tuple[str, str]], str]:
    messages = [{"role": "user", "content": TWO_CITIES}]
    tools = list(tools)
    if not stream:
        r = client.chat.completions.create(messages=messages, tools=tools, **GREEDY, **kwargs)
        calls = r.choices[0].message.tool_calls or []
        return [(c.function.name, c.function.arguments) for c in calls], r.choices[0].finish_reason
    calls, finish = {}, None
    for chunk in client.chat.completions.create(messages=messages, tools=tools, stream=True, **GREEDY, **kwargs):
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(tc.index, ["", ""])
            entry[0] += tc.function.name or ""
            entry[1] += tc.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    return [tuple(v) for v in calls.values()], finish


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_parallel_tool_calls_false_gives_one_call(client, stream, strict):
    """Plain tools: the generation stops where a second call begins; strict ones: the grammar
    lets only the end of the turn follow the first call."""
    tools = [_strict(t) for t in (WEATHER, TIME)] if strict else [WEATHER, TIME]
    both, _ = _calls(client, stream, tools)
    assert len(both) >= 2, both  # the demo model calls once per city when allowed
    one, finish = _calls(client, stream, tools, parallel_tool_calls=False)
    assert one == both[:1] and finish == "tool_calls"


def test_tools_work_without_enable_auto_tool_choice(client):
    r = client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER], **GREEDY)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lisbon"}


STRICT_BOOKING = {"type": "function", "function": {
    "name": "book_table", "strict": True, "description": "Book a table at a restaurant.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["restaurant", "people", "time"],
                   "properties": {"restaurant": {"type": "string"}, "people": {"type": "integer", "minimum": 1},
                                  "time": {"type": "string", "enum": ["18:00", "19:00", "20:00", "21:00"]}}}}}


def _booking_calls(client, strict: bool) -> list[dict]:
    tool = {"type": "function", "function": {**STRICT_BOOKING["function"], "strict": strict}}
    out = []
    for question in ("Book a table at Nopa for 4 people at 8pm.", "Reserve Sushi Bar at 19:00."):
        r = client.chat.completions.create(messages=[{"role": "user", "content": question}], tools=[tool, WEATHER],
                                           **GREEDY)
        for call in r.choices[0].message.tool_calls or []:
            assert call.function.name in ("book_table", "get_weather")
            if call.function.name == "book_table":
                out.append(json.loads(call.function.arguments))
    return out


def _valid(args: dict) -> bool:
    try:
        jsonschema.validate(args, STRICT_BOOKING["function"]["parameters"])
    except jsonschema.ValidationError:
        return False
    return True


def test_strict_tool_calls_follow_the_schema(client):
    """Under tool_choice auto, a strict tool's call is held to its schema once the model opens it
    (the same questions without strict give this small model's calls that miss it)."""
    strict = _booking_calls(client, strict=True)
    assert len(strict) == 2 and all(_valid(args) for args in strict), strict
    assert not all(_valid(args) for args in _booking_calls(client, strict=False))


def test_openai_agents_strict_function_tool(client):
    """openai-agents' function tools are strict by default; through its chat-completions model."""
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from agents.model_settings import ModelSettings
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    asked = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        asked.append(city)
        return json.dumps({"city": city, "temperature": 23, "unit": "celsius", "condition": "sunny"})

    model = OpenAIChatCompletionsModel("demo", AsyncOpenAI(base_url=_base_url(client), api_key="none", max_retries=0))
    agent = Agent(name="weather", instructions="You answer weather questions.", tools=[get_weather], model=model,
                  model_settings=ModelSettings(temperature=0, max_tokens=200))
    result = Runner.run_sync(agent, QUESTION, max_turns=3)
    assert asked and all(isinstance(c, str) and c for c in asked)
    assert isinstance(result.final_output, str) and result.final_output.strip()


# ---------------------------------------------------------------- nulls, unknown models, logprobs

def test_explicit_nulls_mean_defaults(client):
    nulls = {k: None for k in ("presence_penalty", "frequency_penalty", "n", "stream", "logprobs", "top_logprobs",
                               "parallel_tool_calls", "temperature", "top_p", "max_tokens", "stop", "seed", "user",
                               "tools", "tool_choice", "response_format", "stream_options", "logit_bias",
                               "max_completion_tokens", "metadata", "store")}
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello!"}],
                                       extra_body={**nulls, "max_tokens": 20})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_unknown_model_is_404_model_not_found(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hello!"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "invalid_request_error"
    assert "gpt-9" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "invalid_request_error"
    assert client.models.retrieve("demo").id == "demo"


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_logprobs_add_up_to_the_content(client, stream):
    """The demo model reasons first (the template opens <think>); only the answer's tokens count."""
    kwargs = dict(messages=[{"role": "user", "content": "Hello! Who are you?"}], logprobs=True, top_logprobs=2,
                  **GREEDY)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        content, tokens = r.choices[0].message.content, r.choices[0].logprobs.content
        assert r.choices[0].message.reasoning_content  # there was reasoning to leave out
    else:
        content, tokens = "", []
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                tokens += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
    assert content and "".join(t.token for t in tokens) == content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)


# ---------------------------------------------------------------- the output parser, in every chunking

def _chunkings(text: str):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


def _parse(chunks, **kwargs):
    from server.output import ChatMessageParts, ChatOutputParser

    parser = ChatOutputParser(reasoning=True, starts_in_reasoning=True, tools=[WEATHER, TIME], parse_tools=True,
                              **kwargs)
    parts = ChatMessageParts()
    for chunk in chunks:
        parts.add(parser.feed(chunk))
    parts.add(parser.finish())
    return parts, parser.done


CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\n{}\n</parameter>\n</function>\n</tool_call>"


def test_stop_sequences_match_in_the_answer_only():
    text = "Think.\n\nMore.\n</think>\n\nPara one.\n\nPara two.\n\n" + CALL.format("Lisbon")
    for chunks in _chunkings(text):
        parts, done = _parse(chunks, stops=["\n\n"])
        assert (parts.reasoning, parts.content, parts.tool_calls, done) == ("Think.\n\nMore.", "Para one.", {}, True)
    for chunks in _chunkings(text):  # a stop that never comes holds nothing back in the end
        parts, done = _parse(chunks, stops=["\n\nX"])
        assert parts.content == "Para one.\n\nPara two." and len(parts.tool_calls) == 1 and not done


def test_stop_sequences_do_not_cut_tool_call_markup_or_arguments():
    text = "</think>\n\n" + CALL.format("Lisbon\n\nTown")
    for chunks in _chunkings(text):
        parts, done = _parse(chunks, stops=["\n\n", "<parameter"])
        assert json.loads(parts.tool_calls[0].arguments) == {"city": "Lisbon\n\nTown"} and not done


def test_one_call_with_parallel_tool_calls_false():
    text = "</think>\n\nChecking.\n" + CALL.format("Lisbon") + "\n" + CALL.format("Paris")
    for chunks in _chunkings(text):
        parts, done = _parse(chunks, max_calls=1)
        assert parts.content == "Checking." and done
        assert [json.loads(c.arguments) for c in parts.tool_calls.values()] == [{"city": "Lisbon"}]


@pytest.mark.parametrize("stops", [[], ["two"]])
def test_answer_logprobs_add_up_to_the_content(stops):
    """One token per delta, as the engine sends them: reasoning, markup, the first token's leading
    space, trailing whitespace and a call are left out."""
    from server.output import AnswerLogprobs, ChatMessageParts, ChatOutputParser
    from server.protocol import TokenLogprobOut

    tokens = ["Hmm", ".", "\n", "</think>", "\n\n", " Para", " one", ".\n\n", "Para", " two", ".", " \n",
              "<tool_call>", "\n<function=get_weather>\n<parameter=city>\nLisbon\n</parameter>\n</function>\n",
              "</tool_call>"]
    parser = ChatOutputParser(reasoning=True, starts_in_reasoning=True, tools=[WEATHER], parse_tools=True,
                              stops=stops)
    parts, answer, kept = ChatMessageParts(), AnswerLogprobs(), []
    for token in tokens + [""]:
        pieces = parser.feed(token) if token else parser.finish()
        parts.add(pieces)
        kept += answer.step(parser, [TokenLogprobOut(token=token, logprob=-1.0)] if token else [], pieces)
    assert parts.content == ("Para one.\n\nPara two." if not stops else "Para one.\n\nPara")
    assert [k.token for k in kept] == ["Para", " one", ".\n\n", "Para"] + ([" two", "."] if not stops else [])
