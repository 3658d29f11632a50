"""Prompts rendered through the checkpoint's own Qwen3.5 chat template (the fixture carries the real
template); expected texts are written out by hand from the template's format."""

import pytest
from fixtures import get_fixture

from model import load_tokenizer
from server.chat import render_prompt
from server.errors import BadRequest
from server.protocol import ChatCompletionRequest

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"},
                                                                         "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(get_fixture("moe_r4").hf_dir)


def render(tok, messages, tools=None, **kwargs):
    req = ChatCompletionRequest.model_validate({"messages": messages, "tools": tools})
    return render_prompt(tok, req.messages, req.tools, kwargs)


def round_trip(arguments):
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


def test_tool_round_trip_renders_call_and_result(tok):
    prompt = render(tok, round_trip('{"city": "Paris", "days": 2}'), TOOLS)
    assert prompt.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n{")
    assert '"name": "get_weather"' in prompt.split("</tools>")[0]
    assert "</IMPORTANT>\n\nYou are helpful.<|im_end|>\n" in prompt
    tail = prompt[prompt.index("<|im_start|>user"):]
    assert tail == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_arguments_as_object_render_like_json_string(tok):
    assert render(tok, round_trip({"city": "Paris", "days": 2}), TOOLS) == \
        render(tok, round_trip('{"city": "Paris", "days": 2}'), TOOLS)


def test_object_and_array_arguments_render_as_json(tok):
    prompt = render(tok, round_trip({"city": "Paris", "opts": {"a": [1, 2]}, "list": ["x"]}), TOOLS)
    assert '<parameter=opts>\n{"a": [1, 2]}\n</parameter>' in prompt
    assert '<parameter=list>\n["x"]\n</parameter>' in prompt


def test_invalid_argument_json_names_the_field(tok):
    with pytest.raises(BadRequest) as e:
        render(tok, round_trip('{"city": '), TOOLS)
    assert e.value.param == "messages[2].tool_calls[0].function.arguments"


def test_enable_thinking_false_prefills_empty_think(tok):
    prompt = render(tok, [{"role": "user", "content": "hi"}], enable_thinking=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_multi_turn_drops_old_reasoning_and_maps_developer_to_system(tok):
    prompt = render(tok, [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},
        {"role": "user", "content": "Bye"},
    ])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                      "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n")


def test_image_content_is_refused(tok):
    with pytest.raises(BadRequest) as e:
        render(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "image_url" in e.value.message


def test_template_errors_become_bad_requests(tok):
    with pytest.raises(BadRequest) as e:
        render(tok, [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}])
    assert "No user query found in messages" in e.value.message


def test_reserved_template_kwargs_are_refused(tok):
    with pytest.raises(BadRequest):
        render(tok, [{"role": "user", "content": "a"}], tokenize=True)


def test_leading_system_and_developer_messages_merge_and_later_ones_become_user_turns(tok):
    """The template takes one system message, first; pydantic-ai sends two, and some clients send
    one mid-conversation (the template would raise "System message must be at the beginning")."""
    prompt = render(tok, [{"role": "system", "content": "Be brief."},
                          {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"},
                          {"role": "developer", "content": "The user is in Lisbon."},
                          {"role": "user", "content": "Weather?"}])
    assert prompt == (
        "<|im_start|>system\nBe brief.\n\nUse metric units.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nSystem: The user is in Lisbon.<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
