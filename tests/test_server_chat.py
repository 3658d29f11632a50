"""The HTTP server through the real openai client, on the tiny fixture model: chat and completions,
streamed and whole, stop sequences, seeds, logprobs, tool round trips, enforced tool_choice and
json_schema, metrics. References: transformers (the fixture's greedy ids and the chat template
tokenized by the tokenizer itself) and jsonschema."""

import json
import time
import urllib.request

import jsonschema
import openai
import pytest
from fixtures import get_fixture
from fixtures.build import PROMPT_MESSAGES
from server_harness import ServerThread, tiny_app, tiny_engine, tiny_model

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    engine = tiny_engine()
    with ServerThread(tiny_app(engine)) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, messages=None, **kw):
    return client.chat.completions.create(model="tiny", messages=messages or [{"role": "user", "content": "Hi"}],
                                          **kw)


def stream_chat(client, **kw):
    chunks = list(chat(client, stream=True, **kw))
    text = {"content": "", "reasoning": ""}
    for c in chunks:
        for ch in c.choices:
            text["content"] += ch.delta.content or ""
            text["reasoning"] += getattr(ch.delta, "reasoning_content", None) or ""
    return chunks, text


def template_ids(messages, **kwargs):
    _, tok = tiny_model()
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_completion_greedy_matches_transformers(client):
    fx = get_fixture("moe_r4")
    r = client.completions.create(model="tiny", prompt=fx.prompt_ids.tolist(), max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    _, tok = tiny_model()
    assert r.choices[0].text == tok.decode(fx.greedy_ids.tolist(), skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(fx.prompt_ids), 24)


def test_chat_renders_the_checkpoint_template(client):
    r = chat(client, PROMPT_MESSAGES, max_tokens=3)
    assert r.usage.prompt_tokens == len(get_fixture("moe_r4").prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_whole_and_streamed_agree_with_usage(client):
    kw = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = chat(client, **kw)
    msg = whole.choices[0].message
    assert whole.object == "chat.completion" and msg.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert msg.reasoning_content == msg.reasoning  # thinking is on: the prompt opened <think>

    chunks, text = stream_chat(client, stream_options={"include_usage": True}, **kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text["reasoning"] == (msg.reasoning_content or "") and text["content"] == (msg.content or "")
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_sequence_cuts_output(client):
    kw = dict(max_tokens=16, temperature=0, extra_body={"ignore_eos": True, **NO_THINK})
    full = chat(client, **kw).choices[0].message.content
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3)
                if full[i:i + 3].strip() and full.find(full[i:i + 3]) == i)
    r = chat(client, stop=[stop, "never-appears"], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)].rstrip()


def test_seed_reproducibility(client):
    kw = dict(max_tokens=16, temperature=2.0, extra_body={"ignore_eos": True, **NO_THINK})
    a = chat(client, seed=1234, **kw).choices[0].message.content
    b = chat(client, seed=1234, **kw).choices[0].message.content
    c = chat(client, seed=4321, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_logprobs_of_greedy_tokens_are_the_top_ones(client):
    r = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
             extra_body={"ignore_eos": True, **NO_THINK})
    items = r.choices[0].logprobs.content
    # the answer's tokens only: they add up to the content (trimmed whitespace left out)
    assert 0 < len(items) <= r.usage.completion_tokens == 6
    assert "".join(item.token for item in items) == r.choices[0].message.content
    for i, item in enumerate(items):
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        # the first token's leading whitespace is trimmed from the content, and so from its entry
        assert item.top_logprobs[0].token.endswith(item.token) if i == 0 else item.token == item.top_logprobs[0].token
        assert item.logprob <= 0


def test_tool_round_trip_through_the_template(client):
    messages = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    r = chat(client, messages, tools=[WEATHER, CLOCK], max_tokens=60, extra_body=NO_THINK,
             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])

    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    answer = chat(client, history, tools=[WEATHER, CLOCK], tool_choice="none", max_tokens=5, extra_body=NO_THINK)
    assert answer.choices[0].finish_reason in ("stop", "length")
    expected = template_ids(
        messages + [{"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                    {"role": "tool", "content": '{"forecast": "sunny"}'}],
        enable_thinking=False)
    assert answer.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_choice_streams_valid_calls(client, seed):
    chunks, text = stream_chat(client, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False,
                               max_tokens=80, seed=seed, temperature=1.0, extra_body=NO_THINK)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name in ("get_weather", "get_time")
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 1  # arguments arrive after the header
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[first.function.name]["function"]["parameters"]
    jsonschema.validate(args, schema)
    assert text["content"] == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_json_schema_output_always_validates(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = chat(client, response_format=fmt, max_tokens=60, seed=seed, temperature=1.0, extra_body=NO_THINK)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_schema_with_thinking_on_leaves_reasoning_free(client):
    """The grammar starts after </think>; the random model never closes its reasoning, so the
    output stays unconstrained reasoning (the grammar itself is tested in test_constrained.py)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = chat(client, response_format=fmt, max_tokens=12, temperature=0)
    # grammars admit text, not special tokens: ban the one this model would start with
    plain = chat(client, max_tokens=12, temperature=0, logit_bias={"151644": -100})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.reasoning_content == plain.choices[0].message.reasoning_content
    assert not r.choices[0].message.content


def test_completions_stream_and_echo(client):
    prompt = "The quick brown fox"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, echo=True,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text.startswith(prompt)
    parts = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
    assert prompt + "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_prefix_cache_serves_a_repeated_prompt(client):
    messages = [{"role": "user", "content": "Tell me a long story about " + "dragons and castles " * 20}]
    first = chat(client, messages, max_tokens=2)
    second = chat(client, messages, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens >= 64


def test_next_chat_turn_resumes_where_the_history_ended(client):
    """The template renders a finished assistant turn unlike the generation prompt it was answered
    after, so the next turn shares the previous prompt only up to where its history ended: the
    server has the prefix cache keep a snapshot exactly there."""
    _, tok = tiny_model()
    messages = [{"role": "user", "content": "Plan a trip through " + "mountains and lakes " * 25}]
    history = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False,
                                                 enable_thinking=False), add_special_tokens=False)
    first = chat(client, messages, max_tokens=6, extra_body={"ignore_eos": True, **NO_THINK})
    messages += [{"role": "assistant", "content": first.choices[0].message.content or "ok"},
                 {"role": "user", "content": "And after that?"}]
    second = chat(client, messages, max_tokens=2, extra_body=NO_THINK)
    assert second.usage.prompt_tokens_details.cached_tokens == len(history)


def test_a_new_conversation_resumes_where_the_shared_system_prompt_ends(client):
    """Coding agents start every session with the same long system prompt: the server has the prefix
    cache keep the state where it ends (with the first user turn's header, ChatML), kept however
    long a conversation grows past it, so the next session's first request starts from there."""
    _, tok = tiny_model()
    system = "You are a careful coding agent. " + "Follow the repository's conventions. " * 20
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Fix the bug " + "in the parser " * 80}]
    chat(client, first, max_tokens=2, extra_body=NO_THINK)
    second = [{"role": "system", "content": system}, {"role": "user", "content": "Write the tests."}]
    r = chat(client, second, max_tokens=2, extra_body=NO_THINK)
    a, b = (tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False, enable_thinking=False),
                       add_special_tokens=False) for m in (first, second))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 100 and r.usage.prompt_tokens_details.cached_tokens == shared


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = json.loads(urllib.request.urlopen(server.base_url + "/health").read())
    assert health == {"status": "ok"}
    chat(client, max_tokens=2)
    text = urllib.request.urlopen(server.base_url + "/metrics").read().decode()
    for name in ("deltaserve_requests_total", "deltaserve_prompt_tokens_total", "deltaserve_generation_tokens_total",
                 "deltaserve_time_to_first_token_seconds_bucket", "deltaserve_inter_token_latency_seconds_bucket",
                 "deltaserve_num_requests_running", "deltaserve_num_requests_waiting",
                 "deltaserve_prefix_cache_hit_rate", "deltaserve_prefix_cache_bytes"):
        assert name in text, name
    requests = [line for line in text.splitlines() if line.startswith("deltaserve_requests_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in requests) >= 1


def test_constrained_and_free_requests_share_the_batch(client, server):
    from concurrent.futures import ThreadPoolExecutor

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    jobs = [dict(response_format=fmt, seed=s, temperature=1.0) for s in (11, 12)]
    jobs += [dict(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, seed=13, temperature=1.0),
             dict(temperature=0, max_tokens=400, extra_body={"ignore_eos": True})]  # long: the others overlap it
    peak = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, client, **{"max_tokens": 60, "extra_body": NO_THINK, **j}) for j in jobs]
        while not all(f.done() for f in futures):  # watch the whole time they run, however slow the machine
            peak.append(server.engine.stats()["running"])
            time.sleep(0.005)
        results = [f.result() for f in futures]
    assert max(peak) >= 2  # they ran together
    for r in results[:2]:
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    [call] = results[2].choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert results[3].usage.completion_tokens == 400
