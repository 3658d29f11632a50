"""End to end on the embedded demo model: `deltaserve serve model/demo/deltaserve-demo.gguf` (converted
on first use), the openai client, a weather question with tools -> a get_weather call with the right
arguments -> the tool's result -> an answer that uses it; non-streamed and streamed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.demo import DEMO_GGUF
from model.demo.tools import TOOLS


CITY = "Lisbon"
TOOLS_OFFERED = [TOOLS["get_weather"].definition(), TOOLS["get_time"].definition()]
QUESTION = f"What's the weather in {CITY}?"
RESULT = {"city": CITY, "temperature": 23, "unit": "celsius", "condition": "sunny"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from openai import OpenAI

    from model.demo.evaluate import free_port

    port = free_port()
    cache = tmp_path_factory.mktemp("converted")
    log = tmp_path_factory.mktemp("log") / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", str(DEMO_GGUF), "--port", str(port), "--cache-dir", str(cache),
           "--enable-auto-tool-choice", "--served-model-name", "demo", "--log-level", "warning"]
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


def test_tool_call_then_answer(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUESTION}],
                                       tools=TOOLS_OFFERED, temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": CITY}

    r = client.chat.completions.create(model="demo", messages=_second_turn(call.id, call.function.name,
                                                                           call.function.arguments),
                                       tools=TOOLS_OFFERED, temperature=0, max_tokens=200)
    answer = r.choices[0].message
    assert not answer.tool_calls
    assert str(RESULT["temperature"]) in answer.content


def test_tool_call_then_answer_streamed(client):
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": QUESTION}],
                                            tools=TOOLS_OFFERED, temperature=0, max_tokens=200, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
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
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": CITY}

    stream = client.chat.completions.create(model="demo", messages=_second_turn(call["id"], call["name"],
                                                                                call["arguments"]),
                                            tools=TOOLS_OFFERED, temperature=0, max_tokens=200, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert str(RESULT["temperature"]) in content


def test_default_serve_uses_the_demo_model():
    """`deltaserve serve` with no MODEL (the README's command) must serve this GGUF."""
    from server import model_source

    assert Path(model_source.default_model_path()).resolve() == DEMO_GGUF.resolve()
