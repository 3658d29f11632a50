"""End to end on the embedded demo model: `deltaserve serve model/demo/deltaserve-demo.gguf` (converted
on first use), the openai client, a weather question with tools -> a get_weather call with the right
arguments -> the tool's result -> an answer that uses it; non-streamed and streamed."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.ports import free_port

from demo.tools import TOOLS
from model.demo import DEMO_GGUF


CITY = "Lisbon"
TOOLS_OFFERED = [TOOLS["get_weather"].definition(), TOOLS["get_time"].definition()]
QUESTION = f"What's the weather in {CITY}?"
RESULT = {"city": CITY, "temperature": 23, "unit": "celsius", "condition": "sunny"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with serve_demo(tmp_path_factory, "--enable-auto-tool-choice") as c:  # the flag is the default; still accepted
        yield c


@contextlib.contextmanager
def serve_demo(tmp_path_factory, *options: str):
    """`deltaserve serve` of the demo GGUF as model "demo" on a free port -> an openai client for it."""
    from openai import OpenAI

    port = free_port()
    cache = tmp_path_factory.mktemp("converted")
    log = tmp_path_factory.mktemp("log") / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", str(DEMO_GGUF), "--port", str(port), "--cache-dir", str(cache),
           "--served-model-name", "demo", "--log-level", "warning", *options]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"deltaserve serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                c.models.list()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"deltaserve serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield c
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _second_turn(call_id: str, name: str, arguments: str) -> list[dict]:
    return [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(RESULT)}]


def _valid_weather_arguments(arguments: str) -> dict:
    """The arguments as the tool's JSON schema allows them (the exact value is the quality test's)."""
    import jsonschema

    args = json.loads(arguments)
    jsonschema.validate(args, TOOLS["get_weather"].definition()["function"]["parameters"])
    return args


def _ask(client, stream: bool):
    """First turn -> (call id, name, arguments); second turn with the tool's result -> answer text."""
    kwargs = dict(model="demo", tools=TOOLS_OFFERED, temperature=0, max_tokens=200)
    if not stream:
        r = client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], **kwargs)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        first = (call.id, call.function.name, call.function.arguments)
        r = client.chat.completions.create(messages=_second_turn(*first), **kwargs)
        answer = r.choices[0]
        assert not answer.message.tool_calls and answer.finish_reason == "stop", answer.message
        return first, answer.message.content
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], stream=True,
                                                **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function and tc.function.name:
                entry["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls.values()
    first = (call["id"], call["name"], call["arguments"])
    content, finish = "", None
    for chunk in client.chat.completions.create(messages=_second_turn(*first), stream=True, **kwargs):
        if chunk.choices:
            assert not chunk.choices[0].delta.tool_calls
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    return first, content


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_weather_question_round_trip(client, stream):
    """The whole path with a model that really emits the format: a get_weather call whose arguments
    fit the schema, then, given the tool's result, a plain answer (streamed deltas agree)."""
    (call_id, name, arguments), answer = _ask(client, stream)
    assert call_id and name == "get_weather"
    assert isinstance(_valid_weather_arguments(arguments)["city"], str)
    assert answer.strip()


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_weather_call_has_the_users_city_and_answer_uses_the_result(client, stream):
    (_, _, arguments), answer = _ask(client, stream)
    assert json.loads(arguments) == {"city": CITY}
    assert str(RESULT["temperature"]) in answer


def test_default_serve_uses_the_demo_model():
    """`deltaserve serve` with no MODEL (the README's command) must serve this GGUF."""
    from server import model_source

    assert Path(model_source.default_model_path()).resolve() == DEMO_GGUF.resolve()
