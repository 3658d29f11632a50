"""Tool-call and reasoning parsing on a corpus of Qwen3.5 / Qwen3 outputs: the whole text gives the
expected message, and every random chunking of the stream gives the same message, with OpenAI-style
deltas (id and name first, then argument fragments) and no raw XML in content."""

import json
import random
from pathlib import Path

import pytest

from server.output import ChatMessageParts, ChatOutputParser
from server.reasoning import ReasoningParser, prompt_opens_reasoning
from server.tool_parser import CallCounter, ParsedCalls, ToolCallParser, coerce_value, parse_tool_calls

CORPUS = json.loads((Path(__file__).parent / "data" / "tool_call_corpus.json").read_text())
CASES = {c["name"]: c for c in CORPUS["cases"]}
XML_MARKERS = ("<tool_call>", "</tool_call>", "<function=", "<parameter=", "</parameter>", "</function>")


def make_parser(case):
    ids = iter(f"call_{i}" for i in range(100))
    return ChatOutputParser(reasoning=True, starts_in_reasoning=case["starts_in_reasoning"],
                            tools=CORPUS["tools"][case["tools"]], parse_tools=True, make_id=lambda: next(ids))


def run_chunked(case, sizes):
    """Feed the case's text in chunks of the given sizes; returns (message, all pieces)."""
    parser, text, pieces, i = make_parser(case), case["text"], [], 0
    for n in sizes:
        if i >= len(text):
            break
        pieces += parser.feed(text[i:i + n])
        i += n
    if i < len(text):
        pieces += parser.feed(text[i:])
    pieces += parser.finish()
    return ChatMessageParts().add(pieces), pieces


def _no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"repeated JSON keys: {keys}"
    return dict(pairs)


def as_plain(msg: ChatMessageParts):
    return {"reasoning": msg.reasoning, "content": msg.content,
            "tool_calls": [{"name": c.name, "arguments": json.loads(c.arguments, object_pairs_hook=_no_repeated_keys)}
                           for c in msg.tool_calls.values()]}


@pytest.mark.parametrize("name", list(CASES))
def test_whole_text_gives_expected_message(name):
    case = CASES[name]
    msg, _ = run_chunked(case, [len(case["text"])])
    assert as_plain(msg) == case["expect"]


@pytest.mark.parametrize("name", list(CASES))
def test_random_chunkings_match_whole(name):
    case = CASES[name]
    whole, _ = run_chunked(case, [len(case["text"])])
    for seed in range(60):
        rng = random.Random(seed)
        sizes = [rng.choice([1, 1, 2, 3, 5, 8, 13]) for _ in range(len(case["text"]))]
        msg, pieces = run_chunked(case, sizes)
        assert msg == whole, f"seed {seed}"
        started = set()
        for p in pieces:
            if p.channel == "tool_call":
                if p.call.index not in started:  # the first delta of a call names it
                    assert p.call.id and p.call.name, p
                    started.add(p.call.index)
                else:
                    assert p.call.id is None and p.call.name is None
            elif not any(m in case["expect"]["content"] + case["expect"]["reasoning"] for m in XML_MARKERS):
                assert not any(m in p.text for m in XML_MARKERS), f"raw XML leaked: {p.text!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_every_two_piece_split_and_one_character_at_a_time_match_whole(name):
    text = CASES[name]["text"]
    whole, _ = run_chunked(CASES[name], [len(text)])
    for i in range(1, len(text)):
        assert run_chunked(CASES[name], [i])[0] == whole, f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    assert run_chunked(CASES[name], [1] * len(text))[0] == whole


FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=write_file>", "<function=get_weather>", "<function=",
             "</function>", "<parameter=path>", "<parameter=content>", "<parameter=city>", "<parameter=x>",
             "<parameter=", "</parameter>", "\n", "\n", " ", "code", '"', "<", ">", "/", "\\",
             '{"name": "run", "arguments": {"cmd": "ls"}}']


def parse_in_chunks(text, tools, sizes):
    ids = iter(f"call_{i}" for i in range(100))
    parser, events, i = ToolCallParser(tools, CallCounter(lambda: next(ids))), [], 0
    for n in sizes:
        events += parser.feed(text[i:i + n])
        i += n
    return ParsedCalls().add(events + parser.feed(text[i:]) + parser.finish())


def test_random_markup_soup_streams_like_whole():
    """Any text, however broken its markup, parses the same in chunks as whole, into JSON
    arguments without repeated keys."""
    for seed in range(400):
        rng = random.Random(seed)
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 40)))
        tools = CORPUS["tools"][rng.choice(["weather", "code"])] if seed % 5 else None
        whole = parse_in_chunks(text, tools, [])
        for call in whole.calls.values():
            json.loads(call.arguments, object_pairs_hook=_no_repeated_keys)
        for sizes in ([1] * len(text), [rng.choice([2, 3, 7]) for _ in text]):
            assert parse_in_chunks(text, tools, sizes) == whole, f"seed {seed}: {text!r}"


def streamed_arguments(case, text):
    """The argument fragments streamed while feeding `text` one character at a time (no finish)."""
    parser, out = make_parser(case), ""
    for ch in text:
        out += "".join(p.call.arguments for p in parser.feed(ch) if p.channel == "tool_call")
    return parser, out


def test_literal_tags_in_a_string_value_stream_before_the_value_ends():
    """Every tag written as code is streamed as soon as it is decided, before the value's end is fed."""
    case = CASES["markup_strings_in_python_code"]
    code = case["expect"]["tool_calls"][0]["arguments"]["content"]
    end = case["text"].index(code) + len(code)  # up to the newline before the real </parameter>
    _, args = streamed_arguments(case, case["text"][:end])
    assert args == '{"content": "' + json.dumps(code)[1:-1]


def test_closing_tags_after_a_never_closed_quote_are_held_until_decided():
    """`<function=` in the value quotes a call; its closing tags are held back until the end of the
    output shows they closed the real call, then the value closes without them."""
    case = CASES["quoted_call_never_closed_value_ends_at_end"]
    code = case["expect"]["tool_calls"][0]["arguments"]["content"]
    parser, args = streamed_arguments(case, case["text"])
    assert args == '{"path": "names.py", "content": "' + json.dumps(code)[1:-1]
    rest = "".join(p.call.arguments for p in parser.finish() if p.channel == "tool_call")
    assert rest == '"}'


def test_repeated_parameter_without_schema_stays_in_value():
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n</function>\n</tool_call>"
    [call] = parse_tool_calls(text, None).calls.values()
    assert json.loads(call.arguments, object_pairs_hook=_no_repeated_keys) == {"a": "1\n</parameter>\n<parameter=a>\n2"}


def test_one_character_at_a_time_streams_string_arguments_before_the_call_ends():
    case = CASES["literal_parameter_close_in_value"]
    parser, fragments = make_parser(case), []
    for ch in case["text"]:
        fragments += [p.call.arguments for p in parser.feed(ch) if p.channel == "tool_call" and p.call.arguments]
    assert len(fragments) > 10  # streamed, not sent at the end in one piece
    rest = [p.call.arguments for p in parser.finish() if p.channel == "tool_call"]
    assert json.loads("".join(fragments + rest)) == case["expect"]["tool_calls"][0]["arguments"]


def test_parser_off_leaves_tool_xml_in_content():
    text = CASES["several_calls"]["text"]
    parser = ChatOutputParser(reasoning=True, starts_in_reasoning=False, tools=None, parse_tools=False)
    msg = ChatMessageParts().add(parser.feed(text) + parser.finish())
    assert msg.content == text and not msg.tool_calls and parser.num_calls == 0


def test_reasoning_parser_off_keeps_think_text_in_content():
    parser = ChatOutputParser(reasoning=False, starts_in_reasoning=True, tools=None, parse_tools=False)
    msg = ChatMessageParts().add(parser.feed("plan\n</think>\n\nanswer") + parser.finish())
    assert msg.content == "plan\n</think>\n\nanswer" and msg.reasoning == ""


def test_think_markers_split_across_chunks():
    p = ReasoningParser(in_reasoning=True)
    out = p.feed("abc</th") + p.feed("ink>rest<thi") + p.feed("nk>x") + p.finish()
    assert out == [("reasoning", "abc"), ("content", "rest<thi"), ("content", "nk>x")]


@pytest.mark.parametrize("prompt,expected", [
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ("<|im_start|>assistant\n<think>\nold\n</think>\n\nx<|im_end|>\n<|im_start|>assistant\n", False),
])
def test_prompt_opens_reasoning(prompt, expected):
    assert prompt_opens_reasoning(prompt) is expected


@pytest.mark.parametrize("raw,schema,expected", [
    ("5", {"type": "integer"}, 5),
    (" -12 ", {"type": "integer"}, -12),
    ("5.0", {"type": "integer"}, "5.0"),
    ("1e3", {"type": "number"}, 1000.0),
    ("nan", {"type": "number"}, "nan"),
    ("TRUE", {"type": "boolean"}, True),
    ("None", {"type": ["string", "null"]}, None),
    ("None", {"type": "string"}, "None"),
    ("{'a': (1, 2)}", {"type": "object"}, {"a": (1, 2)}),
    ("[1, 2]", {"type": "object"}, "[1, 2]"),
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("7", {"enum": [1, 7]}, 7),
    ("x", {"enum": ["x", "y"]}, "x"),
    ("3", None, "3"),
    ("3.14", {"type": "float"}, 3.14),
    ("[1]", {"type": "list"}, [1]),
])
def test_coerce_value(raw, schema, expected):
    assert coerce_value(raw, schema) == expected


def test_parse_tool_calls_whole_helper():
    text = CASES["text_before_and_after"]["text"]
    parsed = parse_tool_calls(text, CORPUS["tools"]["weather"])
    assert parsed.content == "Let me look that up for you.\n\n\nI asked for Lima's forecast."
    [call] = parsed.calls.values()
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Lima"}
