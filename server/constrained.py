"""Constrained decoding with llguidance: a grammar per request, applied as an engine logits
processor (a token mask per step, inside the batch).

Grammars cover the whole output. When the prompt leaves a <think> block open, the model may
reason freely until </think>; then the body is enforced: a JSON value for response_format, or
Qwen3.5 XML tool calls whose parameters follow each tool's JSON schema for tool_choice
required / named. Under tool_choice auto with strict tools the grammar is lazy: it starts at
each <tool_call> the model opens (TriggeredGrammar)."""

from __future__ import annotations

import json
import logging
import threading
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import BadRequest
from .tool_parser import is_string_param

log = logging.getLogger("deltaserve.constrained")

# Separators as json.dumps writes them, no free whitespace: a model cannot pad forever.
MARKERS = ("<tool_call>", "</tool_call>", "</think>")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def _lit(text: str, specials: Optional[dict] = None) -> str:
    """A grammar literal; markers the tokenizer keeps as special tokens become <[id]> (their text
    cannot be matched byte by byte)."""
    for marker, token_id in (specials or {}).items():
        if marker in text:
            before, _, after = text.partition(marker)
            parts = [p for p in (_lit(before, specials) if before else "", f"<[{token_id}]>",
                                 _lit(after, specials) if after else "") if p]
            return " ".join(parts)
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def think_rules(open_reasoning: bool, specials: Optional[dict] = None) -> tuple[str, str]:
    """(prefix of the start rule, rule definitions) that let an open <think> block finish first."""
    if not open_reasoning:
        return "", ""
    if "</think>" in (specials or {}):
        return "think ", f"think: /(?s:.*)/ <[{specials['</think>']}]> \"\\n\\n\"\n"
    return "think ", "think[lazy]: /(?s:.*)<\\/think>\\n\\n/\n"


def json_grammar(schema: Optional[dict], open_reasoning: bool = False, specials: Optional[dict] = None) -> str:
    prefix, rules = think_rules(open_reasoning, specials)
    return f"start: {prefix}body\n{rules}body: {_json_rule(schema or {'type': 'object'})}\n"


def _param_rules(rule: str, name: str, schema: dict) -> list[str]:
    head = _lit(f"<parameter={name}>\n")
    close = _lit("\n</parameter>\n")
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if is_string_param(schema) and enum:
        choices = " | ".join(_lit(v if isinstance(v, str) else json.dumps(v)) for v in enum)
        return [f"{rule}: {head} ({choices}) {close}"]
    if is_string_param(schema):
        limit = schema.get("maxLength") if isinstance(schema, dict) else None
        body = f".{{0,{int(limit)}}}" if isinstance(limit, int) and limit >= 0 else ".*"
        return [f"{rule}: {head} {rule}_v", f"{rule}_v[lazy]: /(?s:{body})\\n<\\/parameter>\\n/"]
    return [f"{rule}: {head} {_json_rule(schema)} {close}"]


def _call_rules(i: int, tool: dict, specials: Optional[dict], free_arguments: bool = False) -> list[str]:
    fn = tool.get("function", tool)
    head = _lit(f"<tool_call>\n<function={fn['name']}>\n", specials)
    if free_arguments:  # a non-strict tool beside strict ones: its name is checked, its arguments are not
        if "</tool_call>" in (specials or {}):
            return [f"call{i}: {head} call{i}_a <[{specials['</tool_call>']}]>",
                    f"call{i}_a[lazy]: /(?s:.*)<\\/function>\\n/"]
        return [f"call{i}: {head} call{i}_a", f"call{i}_a[lazy]: /(?s:.*)<\\/function>\\n<\\/tool_call>/"]
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    rules, parts = [], []
    for j, (pname, pschema) in enumerate(props.items()):
        rule = f"p{i}_{j}"
        rules += _param_rules(rule, pname, pschema if isinstance(pschema, dict) else {})
        parts.append(rule if pname in required else f"{rule}?")
    tail = _lit("</function>\n</tool_call>", specials)
    rules.insert(0, f"call{i}: {head} {' '.join(parts)} {tail}")
    return rules


def tool_call_grammar(tools: list[dict], only: Optional[str] = None, parallel: bool = True,
                      open_reasoning: bool = False, specials: Optional[dict] = None,
                      strict_only: bool = False) -> str:
    """One or more calls (exactly one with a named function or parallel=False), nothing else.
    strict_only: only tools marked `strict` have their arguments enforced."""
    chosen = [t for t in tools if only is None or t.get("function", t)["name"] == only]
    if not chosen:
        raise BadRequest(f"tool_choice names {only!r}, which is not among the tools", param="tool_choice")
    prefix, rules = think_rules(open_reasoning, specials)
    lines = [f"start: {prefix}body", rules.rstrip("\n")] if rules else [f"start: {prefix}body"]
    lines.append("call: " + " | ".join(f"call{i}" for i in range(len(chosen))))
    lines.append('body: call ("\\n" call)*' if parallel and only is None else "body: call")
    for i, tool in enumerate(chosen):
        lines += _call_rules(i, tool, specials, strict_only and not is_strict(tool))
    return "\n".join(lines) + "\n"


def is_strict(tool: dict) -> bool:
    return bool(tool.get("function", tool).get("strict"))


def _masked(matcher, logits: mx.array) -> mx.array:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = np.zeros(logits.shape[-1], dtype=bool)
    n = min(len(bits), logits.shape[-1])
    allowed[:n] = bits[:n]
    return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))


class GrammarProcessor:
    """Engine logits processor: feeds the request's new tokens to the matcher, masks the rest."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.consumed = 0
        self.failed = False

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        m = self.matcher
        for tok in generated[self.consumed:]:
            if not self.failed and not m.consume_token(tok):
                self.failed = True
                log.warning("grammar rejected token %d: %s", tok, m.get_error())
        self.consumed = len(generated)
        if self.failed:
            return logits
        return _masked(m, logits)


class TriggeredGrammar:
    """A lazy grammar for tool_choice auto: text is free until the model opens a call (the
    <tool_call> token); from there the matcher (a grammar of one call) holds it to an offered
    tool and that tool's schema. When the call closes, text is free again until the next one,
    or, with `once` (parallel_tool_calls false), only the end of the turn may follow."""

    def __init__(self, matcher, trigger_id: int, once: bool):
        self.matcher = matcher
        self.trigger_id = trigger_id
        self.once = once
        self.active = False  # inside a call (or, with once, after it)
        self.used = False
        self.consumed = 0
        self.failed = False

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        m = self.matcher
        for tok in generated[self.consumed:]:
            if self.failed:
                break
            if not self.active:
                if tok != self.trigger_id:
                    continue
                if self.used:
                    m.reset()
                self.active = self.used = True
            if not m.consume_token(tok):
                self.failed = True
                log.warning("tool-call grammar rejected token %d: %s", tok, m.get_error())
            elif m.is_accepting() and not self.once:
                self.active = False  # the call is complete
        self.consumed = len(generated)
        if self.failed or not self.active:
            return logits
        return _masked(m, logits)


class LogitBias:
    """OpenAI logit_bias: {token id: bias} added to the logits."""

    def __init__(self, bias: dict[str, float]):
        self.ids = mx.array([int(k) for k in bias])
        self.values = mx.array(list(bias.values()), dtype=mx.float32)

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        ok = self.ids < logits.shape[-1]
        ids = mx.where(ok, self.ids, 0)
        return logits.at[ids].add(mx.where(ok, self.values, 0.0).astype(logits.dtype))


class GrammarCompiler:
    """Builds the llguidance tokenizer once (about a second) and a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll = None
        self._specials: Optional[dict] = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                n_vocab = max(self.vocab_size, len(self.tokenizer))
                self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab)
            return self._ll

    def specials(self) -> dict[str, int]:
        """Grammar markers that this tokenizer holds as special tokens (none in Qwen's own
        tokenizers, where <tool_call> and </think> are ordinary added tokens)."""
        if self._specials is None:
            ll, out = self._ll_tokenizer(), {}
            for marker in MARKERS:
                token_id = self.tokenizer.convert_tokens_to_ids(marker)
                if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id \
                        and ll.is_special_token(token_id):
                    out[marker] = token_id
            self._specials = out
        return self._specials

    def for_json(self, schema: Optional[dict], open_reasoning: bool) -> GrammarProcessor:
        return self.processor(json_grammar(schema, open_reasoning, self.specials()), "response_format")

    def for_tools(self, tools: list[dict], only: Optional[str], parallel: bool, open_reasoning: bool):
        return self.processor(tool_call_grammar(tools, only, parallel, open_reasoning, self.specials()), "tools")

    def for_auto_tools(self, tools: list[dict], parallel: bool) -> Optional[TriggeredGrammar]:
        """tool_choice auto with a strict tool: each call the model opens is held to the offered
        tools (strict ones to their schema). None where there is nothing to enforce, or where
        this tokenizer has no single <tool_call> token to trigger on."""
        if not any(is_strict(t) for t in tools):
            return None
        trigger = self.tokenizer.convert_tokens_to_ids("<tool_call>")
        if not isinstance(trigger, int) or trigger == self.tokenizer.unk_token_id:
            log.warning("strict tools are not enforced: this tokenizer has no <tool_call> token")
            return None
        lark = tool_call_grammar(tools, None, False, False, self.specials(), strict_only=True)
        return TriggeredGrammar(self._matcher(lark, "tools"), trigger, once=not parallel)

    def processor(self, lark: str, param: str = "response_format") -> GrammarProcessor:
        """Compile a grammar (call it off the event loop: big schemas take a while)."""
        return GrammarProcessor(self._matcher(lark, param), self.vocab_size)

    def _matcher(self, lark: str, param: str):
        import llguidance

        ll = self._ll_tokenizer()
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error:
            raise BadRequest(f"cannot enforce this schema: {messages[0]}", param=param)
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        if matcher.is_error():
            raise BadRequest(f"cannot enforce this schema: {matcher.get_error()}", param=param)
        return matcher
