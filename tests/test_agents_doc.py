"""docs/agents.md, block by block, against the embedded demo model on a real socket.

Every block the doc marks `<!-- tested: NAME -->` is tested here as written; only the doc's
http://127.0.0.1:8000 is rewritten to the test server's address. The serve block goes through
`deltaserve serve`'s own argument parser and gives the test server its served names and API key.
Python blocks are executed and their results checked (a chat answer, a tool call with the right
arguments). Claude Code, Codex and OpenCode do not install here: their environment, TOML and JSON are
parsed, and the routes and names they configure are driven by the anthropic and openai SDKs built from
the parsed values, as those tools would send them."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import anthropic
import httpx
import pytest
from openai import OpenAI
from server_harness import ServerThread

from demo.tools import TOOLS
from model.demo import DEMO_GGUF

DOC = Path(__file__).resolve().parents[1] / "docs" / "agents.md"
DOC_URL = "http://127.0.0.1:8000"
TESTED = re.compile(r"^<!-- tested: ([\w-]+) -->\n```\w+\n(.*?)^```", re.M | re.S)
QUESTION = "What's the weather in Lisbon?"
WEATHER = TOOLS["get_weather"].definition()


def blocks() -> dict[str, str]:
    found = TESTED.findall(DOC.read_text())
    assert len({name for name, _ in found}) == len(found), "two blocks share a tested: name"
    return dict(found)


def shell_lines(script: str) -> list[str]:
    return [line for line in script.replace("\\\n", " ").splitlines() if line.strip()]


def exports(script: str) -> tuple[dict[str, str], list[str]]:
    """`export NAME=VALUE` lines (values expanded as the shell would, from os.environ) and the other lines."""
    env, rest = {}, []
    for line in shell_lines(script):
        words = shlex.split(line)
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = os.path.expandvars(value)
        else:
            rest.append(line)
    return env, rest


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The doc's serve command, parsed by deltaserve's parser, serving the demo model instead of the big one
    (small memory budgets and a short default max_tokens keep it quick; names and key are the doc's)."""
    from convert import cached_conversion
    from model import load
    from server.app import create_app
    from server.cli import build_parser, settings_from_args
    from server.engine import Engine

    env, commands = exports(blocks()["serve"])
    (command,) = commands
    argv = shlex.split(command)
    assert argv[:2] == ["deltaserve", "serve"], command
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        args = build_parser().parse_args(argv[1:])  # the key default is read from the environment here
        settings = dataclasses.replace(settings_from_args(args), max_tokens=300, max_model_len=None, max_num_seqs=4,
                                       memory_budget_bytes=2 << 30, prefix_cache_bytes=256 << 20)
        assert settings.api_key, "the doc's serve block sets no API key, so the key handling is untested"
        model, tokenizer = load(cached_conversion(DEMO_GGUF, cache_root=tmp_path_factory.mktemp("converted")))
        engine = Engine(model, tokenizer, settings.engine_config())
        try:
            with ServerThread(create_app(settings, engine)) as server:
                yield server, args
        finally:
            engine.shutdown()


@pytest.fixture
def server(served):
    return served[0]


def served_names(server) -> set[str]:
    r = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {os.environ['DELTASERVE_API_KEY']}"})
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}


def run_python(name: str, server) -> dict:
    """Execute the doc's block as a script; its globals come back for checking."""
    code = blocks()[name].replace(DOC_URL, server.base_url)
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"{DOC.name}:{name}", "exec"), namespace)
    return namespace


def test_every_tested_block_has_a_test():
    assert set(blocks()) == {"serve", "claude-code", "anthropic-sdk", "codex", "opencode", "openai-agents",
                             "langchain", "litellm"}


def test_the_serve_command_listens_where_the_examples_point(served):
    _, args = served
    url = urlsplit(DOC_URL)
    assert (args.host, args.port) == (url.hostname, url.port)


def test_claude_code_environment_through_the_anthropic_sdk(server, monkeypatch, capsys):
    env, commands = exports(blocks()["claude-code"])
    assert commands == ["claude"]
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # Claude Code would prefer it to the token
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace(DOC_URL, server.base_url))
    assert env["ANTHROPIC_AUTH_TOKEN"] == os.environ["DELTASERVE_API_KEY"]
    # every model Claude Code may ask for is served
    models = {name: value for name, value in env.items() if name.endswith("_MODEL")}
    assert {"ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL"} <= set(models)
    assert set(models.values()) <= served_names(server)

    client = anthropic.Anthropic(max_retries=0, timeout=300)  # base URL and token from the environment alone
    ask = dict(max_tokens=300, messages=[{"role": "user", "content": "Hello! How are you?"}])
    for model in sorted(set(models.values())):
        message = client.messages.create(model=model, **ask)
        assert message.stop_reason == "end_turn" and message.content[-1].text.strip()
    with client.messages.stream(model=env["ANTHROPIC_MODEL"], **ask) as stream:
        assert stream.get_final_message().content[-1].text.strip()
    assert client.messages.count_tokens(model=env["ANTHROPIC_MODEL"], messages=ask["messages"]).input_tokens > 0
    # the doc's account of a name not served
    with pytest.raises(anthropic.NotFoundError) as refused:
        client.messages.create(model="claude-haiku-4-5", **ask)
    assert refused.value.body["error"]["type"] == "not_found_error" and "claude-haiku-4-5" in str(refused.value)

    # the doc's alternative: ANTHROPIC_API_KEY, sent as x-api-key
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN")
    monkeypatch.setenv("ANTHROPIC_API_KEY", env["ANTHROPIC_AUTH_TOKEN"])
    keyed = anthropic.Anthropic(max_retries=0, timeout=300)
    assert keyed.messages.create(model=env["ANTHROPIC_MODEL"], **ask).content[-1].text.strip()
    monkeypatch.setenv("ANTHROPIC_API_KEY", "wrong")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(max_retries=0).messages.create(model=env["ANTHROPIC_MODEL"], **ask)
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", env["ANTHROPIC_AUTH_TOKEN"])
    monkeypatch.delenv("ANTHROPIC_API_KEY")

    namespace = run_python("anthropic-sdk", server)
    assert namespace["message"].content[-1].text.strip()
    assert namespace["message"].content[-1].text in capsys.readouterr().out


def test_codex_provider_through_the_openai_sdk(server):
    config = tomllib.loads(blocks()["codex"])
    provider = config["model_providers"][config["model_provider"]]
    assert config["model_provider"] not in ("openai", "ollama", "lmstudio")  # Codex's built-in provider ids
    assert provider["wire_api"] == "responses"
    assert config["model"] in served_names(server)
    assert os.environ[provider["env_key"]]
    client = OpenAI(base_url=provider["base_url"].replace(DOC_URL, server.base_url),
                    api_key=os.environ[provider["env_key"]], max_retries=0, timeout=300)
    # unstored and streamed, so each turn resends the whole conversation, reasoning items included
    turn = dict(model=config["model"], instructions="You are a helpful assistant.", stream=True, store=False,
                include=["reasoning.encrypted_content"], tools=[{"type": "function", **WEATHER["function"]}],
                tool_choice="auto", parallel_tool_calls=False, temperature=0, max_output_tokens=300)
    conversation = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    events = list(client.responses.create(input=conversation, **turn))
    assert events[-1].type == "response.completed"
    output = events[-1].response.output
    calls = [item for item in output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Lisbon"})]
    conversation += [item.model_dump(exclude_none=True) for item in output]
    conversation.append({"type": "function_call_output", "call_id": calls[0].call_id,
                         "output": json.dumps({"city": "Lisbon", "temperature": 23, "condition": "sunny"})})
    events = list(client.responses.create(input=conversation, **turn))
    assert events[-1].type == "response.completed" and "23" in events[-1].response.output_text


def test_opencode_provider_through_the_openai_sdk(served):
    server, args = served
    config = json.loads(blocks()["opencode"])
    provider_id, model = config["model"].split("/", 1)
    provider = config["provider"][provider_id]
    assert provider["npm"] == "@ai-sdk/openai-compatible"  # the AI SDK's chat-completions provider
    assert model in provider["models"] and model in served_names(server)
    assert provider["models"][model]["limit"]["context"] == args.max_model_len
    key = re.fullmatch(r"\{env:(\w+)\}", provider["options"]["apiKey"])
    client = OpenAI(base_url=provider["options"]["baseURL"].replace(DOC_URL, server.base_url),
                    api_key=os.environ[key.group(1)], max_retries=0, timeout=300)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            tools=[WEATHER], stream=True, temperature=0, max_tokens=300)
    name, arguments, finish = "", "", None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Lisbon"}, "tool_calls")


def test_openai_agents_snippet(server, capsys):
    from agents.items import ToolCallItem

    result = run_python("openai-agents", server)["result"]
    calls = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Lisbon"})]
    assert "23" in result.final_output and result.final_output in capsys.readouterr().out


def test_langchain_snippet(server):
    namespace = run_python("langchain", server)
    assert namespace["reply"].text.strip()
    assert (namespace["call"]["name"], namespace["call"]["args"]) == ("get_weather", {"city": "Lisbon"})


def test_litellm_snippet(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the cost map from the network
    namespace = run_python("litellm", server)
    assert namespace["reply"].choices[0].message.content.strip()
    assert namespace["response"].output[-1].content[0].text.strip()
