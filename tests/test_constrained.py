"""Grammar-constrained decoding without a model: random logits go through GrammarProcessor, the
masked argmax is fed back, and whatever comes out must parse (tool parser / json) and validate
against the schema (jsonschema, an implementation we did not write)."""

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture

from model import load_tokenizer
from server.constrained import GrammarCompiler, LogitBias, json_grammar, tool_call_grammar
from server.errors import BadRequest
from server.output import ChatMessageParts, ChatOutputParser

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "units": {"type": "string", "enum": ["metric", "imperial"]},
                   "detail": {"type": "object", "properties": {"hourly": {"type": "boolean"}},
                              "required": ["hourly"], "additionalProperties": False}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler():
    tok = load_tokenizer(get_fixture("moe_r4").hf_dir)
    return GrammarCompiler(tok, vocab_size=151936 + 64), tok  # a padded vocab, as real checkpoints have


def decode(compiler, lark, seed, prefix="", max_steps=300):
    """Greedy decoding of random logits under the grammar; `prefix` is forced first (as a model
    would write it), through the same processor."""
    comp, tok = compiler
    proc = comp.processor(lark)
    rng = np.random.default_rng(seed)
    out = list(tok.encode(prefix, add_special_tokens=False)) if prefix else []
    for _ in range(max_steps):
        logits = mx.array(rng.standard_normal(comp.vocab_size).astype(np.float32) * 4)
        tok_id = int(mx.argmax(proc(out, logits)).item())
        if tok_id == tok.eos_token_id:
            return tok.decode(out), True
        out.append(tok_id)
    return tok.decode(out), False


def parse(text, tools, in_reasoning=False):
    parser = ChatOutputParser(reasoning=True, starts_in_reasoning=in_reasoning, tools=tools, parse_tools=True)
    return ChatMessageParts().add(parser.feed(text) + parser.finish())


@pytest.mark.parametrize("seed", range(6))
def test_named_tool_choice_always_gives_one_valid_call(compiler, seed):
    text, finished = decode(compiler, tool_call_grammar([WEATHER, CLOCK], only="get_weather"), seed)
    assert finished, text
    msg = parse(text, [WEATHER, CLOCK])
    [call] = msg.tool_calls.values()
    assert call.name == "get_weather" and msg.content == ""
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("seed", range(6))
def test_required_without_parallel_calls_one_of_the_tools(compiler, seed):
    text, finished = decode(compiler, tool_call_grammar([WEATHER, CLOCK], parallel=False), seed)
    assert finished, text
    [call] = parse(text, [WEATHER, CLOCK]).tool_calls.values()
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)


def test_required_with_parallel_calls_allows_several(compiler):
    lark = tool_call_grammar([CLOCK], parallel=True)
    comp, tok = compiler
    proc = comp.processor(lark)
    two = '<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n</parameter>\n</function>\n</tool_call>'
    ids = tok.encode(two + "\n" + two, add_special_tokens=False)
    logits = mx.zeros(comp.vocab_size)
    for i in range(len(ids)):  # every token of two calls in a row is allowed
        assert proc(ids[:i], logits)[ids[i]].item() == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_parses_and_validates(compiler, seed):
    text, finished = decode(compiler, json_grammar(PERSON), seed)
    assert finished, text
    jsonschema.validate(json.loads(text), PERSON)


def test_grammar_waits_for_open_reasoning_to_close(compiler):
    lark = json_grammar(PERSON, open_reasoning=True)
    text, finished = decode(compiler, lark, seed=1, prefix="Let me think about a person.</think>\n\n")
    assert finished, text
    msg = parse(text, None, in_reasoning=True)
    assert msg.reasoning == "Let me think about a person."
    jsonschema.validate(json.loads(msg.content), PERSON)


def test_tool_grammar_after_reasoning(compiler):
    lark = tool_call_grammar([CLOCK], only="get_time", open_reasoning=True)
    text, finished = decode(compiler, lark, seed=2, prefix="The user wants the time.</think>\n\n")
    assert finished, text
    msg = parse(text, [CLOCK], in_reasoning=True)
    assert msg.reasoning == "The user wants the time."
    assert [json.loads(c.arguments)["zone"] in ("UTC", "CET") for c in msg.tool_calls.values()] == [True]


def test_mask_blocks_disallowed_tokens_and_padding(compiler):
    comp, tok = compiler
    proc = comp.processor(json_grammar({"type": "object"}))
    out = proc([], mx.zeros(comp.vocab_size))
    allowed = np.isfinite(np.array(out))
    assert allowed[tok.encode("{", add_special_tokens=False)[0]]
    assert not allowed[tok.encode("hello", add_special_tokens=False)[0]]
    assert not allowed[-64:].any()  # ids past the tokenizer never come out


def test_unsupported_schema_is_a_bad_request(compiler):
    with pytest.raises(BadRequest):
        compiler[0].processor(json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))


def test_processor_keeps_up_when_called_after_several_tokens(compiler):
    """The engine may call the processor after more than one new token (first call after prefill)."""
    comp, tok = compiler
    proc = comp.processor(json_grammar(PERSON))
    ids = tok.encode('{"name": "Ann", "age": 4', add_special_tokens=False)
    masked = np.array(proc(ids, mx.zeros(comp.vocab_size)))
    assert np.isfinite(masked[tok.encode(",", add_special_tokens=False)[0]])
    assert not np.isfinite(masked[tok.encode('"', add_special_tokens=False)[0]])


def test_logit_bias_adds_to_chosen_ids():
    out = LogitBias({"3": 5.0, "999999": 100.0})([], mx.zeros(10))
    assert out.tolist() == [0, 0, 0, 5, 0, 0, 0, 0, 0, 0]


def test_named_function_must_exist():
    with pytest.raises(BadRequest):
        tool_call_grammar([CLOCK], only="get_weather")



def test_special_token_markers_use_token_ids(compiler):
    """Where a tokenizer keeps </think> as a special token, the grammar names the token itself
    (here <|im_start|>, 151644, stands in for it)."""
    specials = {"</think>": 151644}
    lark = json_grammar(PERSON, open_reasoning=True, specials=specials)
    text, finished = decode(compiler, lark, seed=3, prefix="Thinking it over.<|im_start|>\n\n")
    assert finished, text
    reasoning, _, body = text.partition("<|im_start|>\n\n")
    assert reasoning == "Thinking it over."
    jsonschema.validate(json.loads(body), PERSON)
    lines = tool_call_grammar([CLOCK], only="get_time", specials={"<tool_call>": 7}).splitlines()
    head = next(line for line in lines if line.startswith("call0:"))
    assert head.startswith('call0: <[7]> "\\n<function=get_time>\\n"'), head


def test_qwen_markers_are_text_in_the_fixture_tokenizer(compiler):
    assert compiler[0].specials() == {}


def _lazy_decode(comp, tok, tools, forced: str, parallel: bool, seed: int, max_steps=200):
    """Random logits through the auto-mode processor, with `forced` written first as a model would."""
    proc = comp.for_auto_tools(tools, parallel)
    rng = np.random.default_rng(seed)
    out = list(tok.encode(forced, add_special_tokens=False))
    masked_before = []
    for i in range(len(out)):  # text before the call is free: the processor leaves the logits alone
        logits = mx.array(rng.standard_normal(comp.vocab_size).astype(np.float32))
        masked_before.append(bool(mx.any(proc(out[:i], logits) != logits).item()))
    for _ in range(max_steps):
        logits = mx.array(rng.standard_normal(comp.vocab_size).astype(np.float32) * 4)
        tok_id = int(mx.argmax(proc(out, logits)).item())
        if tok_id == tok.eos_token_id:
            break
        out.append(tok_id)
    return tok.decode(out), masked_before


@pytest.fixture(scope="module")
def qwen_markers():
    """The fixture tokenizer with Qwen's <tool_call> and </tool_call> as the single (added, not
    special) tokens real Qwen3.5 tokenizers have: the lazy grammar is triggered by that token."""
    tok = load_tokenizer(get_fixture("moe_r4").hf_dir)
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    return GrammarCompiler(tok, vocab_size=151936 + 64), tok


@pytest.mark.parametrize("seed", range(4))
def test_strict_tool_under_auto_is_enforced_from_the_call_on(qwen_markers, seed):
    comp, tok = qwen_markers
    tools = [{"type": "function", "function": {**t["function"], "strict": True}} for t in (WEATHER, CLOCK)]
    text, masked_before = _lazy_decode(comp, tok, tools, "Let me check.<tool_call>", False, seed)
    assert not any(masked_before[:-1])
    parsed = parse(text, tools)
    assert parsed.content == "Let me check." and len(parsed.tool_calls) == 1
    call = parsed.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)
    assert text.endswith("</tool_call>")  # parallel_tool_calls false: only the end may follow


def test_non_strict_tool_beside_a_strict_one_keeps_free_arguments(qwen_markers):
    comp, tok = qwen_markers
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    free = "<tool_call>\n<function=get_time>\n<parameter=anything>\nx\n</parameter>\n</function>\n</tool_call>"
    wrong = "<tool_call>\n<function=get_weather>\n<parameter=anything>\n"
    for text, ok in ((free, True), (wrong, False), ("<tool_call>\n<function=unknown>", False)):
        proc = comp.for_auto_tools([strict, CLOCK], True)
        ids = list(tok.encode("Sure. " + text, add_special_tokens=False))
        proc(ids, mx.zeros(comp.vocab_size))
        assert proc.failed != ok, text
        assert not proc.active or not ok  # after a complete call the text is free again


def test_no_strict_tool_means_no_lazy_grammar(qwen_markers, compiler):
    assert qwen_markers[0].for_auto_tools([WEATHER, CLOCK], True) is None
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    assert compiler[0].for_auto_tools([strict], True) is None  # no <tool_call> token to trigger on
