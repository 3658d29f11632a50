"""Tool calls in Qwen3 output, streamed: the Qwen3.5 / Qwen3-Coder XML form

    <tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>

and the older Qwen3 JSON form `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

`ToolCallParser.feed(text)` returns events as soon as they are certain: plain text, a call's
header (index, id, name), fragments of its JSON arguments, its end. Concatenating one call's
fragments gives its arguments as a JSON object. Feeding a text whole or in any chunking gives
the same events, merged. Text that only looks like a call (`<tool_call>` in prose) stays text.

Where a value ends is decided with the tool's schema, so that code written into a string value
(a coding agent editing a parser or a chat template) stays in the value:
- a value ends at `</parameter>` followed by a new parameter, `</function>`, `</tool_call>`, the
  next call or the end of the output; any other `</parameter>` is text;
- `<parameter=NAME>` starts a new parameter only for a NAME the tool has and was not given yet
  (after a closed non-string value, any NAME not given yet); otherwise it is text, so a call
  never repeats a JSON key. A value whose `</parameter>` is missing ends there too, or at a
  `</function>` that closes the call (followed by `</tool_call>`, the next call or the end);
- a `<function=` inside a value opens a quoted call: until its `</function>`, markup is text,
  unless that `</function>` is followed by the end of the output or by the next call (then the
  quote was never closed and this was the real end).
String values stream as they are generated; text that may still turn out to be a tag is held
back until it is decided.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAM_OPEN = "<parameter="
PARAM_CLOSE = "</parameter>"
# what may follow </parameter> at a value's end (whitespace between)
_VALUE_END_FOLLOWERS = (PARAM_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FUNCTION_OPEN)
# tags that may end a value or change how later tags in it are read
_VALUE_MARKERS = (PARAM_CLOSE, PARAM_OPEN, FUNCTION_CLOSE, FUNCTION_OPEN)
# a string token of the JSON form (possibly unterminated, so a partial string hides its tags) or its end
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|' + TOOL_CALL_CLOSE, re.S)
MAX_NAME_CHARS = 256


@dataclass
class Text:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    fragment: str


@dataclass
class CallEnd:
    index: int


Event = Text | CallStart | CallArgs | CallEnd


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallCounter:
    """Hands out call indexes; shared by the parsers of one response (reasoning and content)."""

    def __init__(self, make_id: Callable[[], str] = new_call_id):
        self.next = 0
        self.make_id = make_id

    def take(self) -> tuple[int, str]:
        self.next += 1
        return self.next - 1, self.make_id()


# ---- typing parameter values by the tool's JSON schema ----

# Python's names, which hand-written tool schemas use for JSON Schema's
_TYPE_ALIASES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                 "dict": "object", "list": "array"}


def _schema_types(schema: dict) -> list[str]:
    t = schema.get("type")
    types = list(t) if isinstance(t, list) else [t] if isinstance(t, str) else []
    types = [_TYPE_ALIASES.get(x, x) for x in types]
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            if isinstance(sub, dict):
                types += [x for x in _schema_types(sub) if x not in types]
    if not types and "enum" in schema:
        types = ["string" if isinstance(v, str) else "any" for v in schema["enum"]]
    return types


def _json_or_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # models sometimes write Python literals (True, None, 'x')


def _as_type(value: str, kind: str) -> tuple[bool, Any]:
    v = value.strip()
    if kind == "null" and v.lower() in ("null", "none"):
        return True, None
    if kind == "integer" and re.fullmatch(r"[-+]?\d+", v):
        return True, int(v)
    if kind == "number":
        if re.fullmatch(r"[-+]?\d+", v):
            return True, int(v)
        try:
            f = float(v)
        except ValueError:
            return False, None
        return (True, f) if f == f and f not in (float("inf"), float("-inf")) else (False, None)
    if kind == "boolean" and v.lower() in ("true", "false"):
        return True, v.lower() == "true"
    if kind in ("object", "array", "any"):
        try:
            parsed = _json_or_literal(v)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return False, None
        ok = {"object": dict, "array": list}.get(kind)
        return (ok is None or isinstance(parsed, ok)), parsed
    return False, None


def coerce_value(value: str, schema: Optional[dict]) -> Any:
    """A parameter's raw text -> the JSON value its schema asks for (the raw text if none fits)."""
    if not isinstance(schema, dict):
        return value
    types = _schema_types(schema)
    for kind in sorted(types, key=lambda k: k == "string"):  # string last: it always fits
        if kind == "string":
            return value
        ok, parsed = _as_type(value, kind)
        if ok:
            return parsed
    return value


def is_string_param(schema: Optional[dict]) -> bool:
    """Raw text is the value (so it can be streamed) unless the schema asks for another type."""
    if not isinstance(schema, dict):
        return True
    types = _schema_types(schema)
    return not types or types == ["string"]


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """{function name: {parameter name: schema}} from OpenAI-style tool definitions."""
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool)
        params = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name", "")] = params if isinstance(params, dict) else {}
    return out


def _partial_suffix(buf: str, *markers: str) -> int:
    """Length of the longest end of buf that is a proper prefix of a marker (held back)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:n]):
                best = n
                break
    return best


def _tag_name(rest: str, final: bool) -> Optional[str]:
    """NAME from the `NAME>` that rest starts with: "" if it is not one, None until `>` comes."""
    k = rest.find(">")
    name = rest[:k] if k >= 0 else rest
    if "\n" in name or "<" in name or len(name) > MAX_NAME_CHARS:
        return ""
    if k < 0:
        return "" if final else None
    return name.strip()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class _Call:
    def __init__(self, index: int, call_id: str, name: str, params: dict, wrapped: bool):
        self.index, self.id, self.name, self.params = index, call_id, name, params
        self.wrapped = wrapped  # opened by <tool_call>, so closed by </function></tool_call>
        self.num_args = 0
        self.arg_name = ""
        self.arg_streams = False
        self.value = ""  # raw text of the current value not yet emitted (string) or all of it
        self.started_value = False
        self.given: set[str] = set()
        self.quotes = 0  # calls quoted in the current value whose </function> has not come yet


class ToolCallParser:
    """Streaming state machine; see the module docstring."""

    def __init__(self, tools: list[dict] | None = None, counter: CallCounter | None = None):
        self.schemas = tool_schemas(tools)
        self.counter = counter or CallCounter()
        self.buf = ""
        self.state = "text"
        self.call: Optional[_Call] = None
        self.pending_open = ""  # the raw text of a call not yet committed, emitted as text if it is not one

    # ---- public ----
    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while self._step(out, final=False):
            pass
        return _merge(out)

    def finish(self) -> list[Event]:
        out: list[Event] = []
        while self._step(out, final=True):
            pass
        if self.call is not None:  # cut off mid-call (length limit): close what we have
            if self.state == "value":
                self._end_value(out, self.buf)
            self._end_call(out)
        elif self.pending_open or self.buf:
            if self.state == "json":
                self._finish_json(out, self.buf, final=True)
            else:
                out.append(Text(self.pending_open + self.buf))
        self.buf, self.pending_open, self.state = "", "", "text"
        return _merge(out)

    # ---- the machine: each step consumes some of buf; False when it needs more input ----
    def _step(self, out: list[Event], final: bool) -> bool:
        return getattr(self, f"_s_{self.state}")(out, final)

    def _s_text(self, out, final):
        i, j = self.buf.find(TOOL_CALL_OPEN), self.buf.find(FUNCTION_OPEN)
        hits = [(k, m) for k, m in ((i, TOOL_CALL_OPEN), (j, FUNCTION_OPEN)) if k >= 0]
        if hits:
            k, marker = min(hits)
            if k:
                out.append(Text(self.buf[:k]))
            self.pending_open = marker
            self.buf = self.buf[k + len(marker):]
            self.state = "open" if marker == TOOL_CALL_OPEN else "name"
            return True
        hold = 0 if final else _partial_suffix(self.buf, TOOL_CALL_OPEN, FUNCTION_OPEN)
        if len(self.buf) > hold:
            out.append(Text(self.buf[: len(self.buf) - hold]))
            self.buf = self.buf[len(self.buf) - hold:]
        return False

    def _s_open(self, out, final):
        """After <tool_call>: the XML form, the JSON form, or prose after all."""
        rest = self.buf.lstrip()
        if rest.startswith(FUNCTION_OPEN):
            self.pending_open += self.buf[: len(self.buf) - len(rest) + len(FUNCTION_OPEN)]
            self.buf = rest[len(FUNCTION_OPEN):]
            self.state = "name"
            return True
        if rest.startswith("{"):
            self.state = "json"
            return True
        if (not rest or FUNCTION_OPEN.startswith(rest)) and not final:
            return False
        return self._not_a_call(out)

    def _not_a_call(self, out) -> bool:
        out.append(Text(self.pending_open))
        self.pending_open = ""
        self.state = "text"
        return True

    def _s_name(self, out, final):
        name = _tag_name(self.buf, final)
        if name is None:
            return False
        if not name:
            return self._not_a_call(out)
        self.buf = self.buf[self.buf.find(">") + 1:]
        wrapped = self.pending_open.startswith(TOOL_CALL_OPEN)
        self.pending_open = ""
        index, call_id = self.counter.take()
        self.call = _Call(index, call_id, name, self.schemas.get(name, {}), wrapped)
        out.append(CallStart(index, call_id, name))
        self.state = "params"
        return True

    def _s_params(self, out, final):
        """Between parameters: the next <parameter=...>, or the end of the call."""
        rest = self.buf.lstrip()
        for marker, state in ((PARAM_OPEN, "param_name"), (FUNCTION_CLOSE, "close"), (TOOL_CALL_CLOSE, None)):
            if rest.startswith(marker):
                self.buf = rest[len(marker):]
                if state is None:
                    self._end_call(out)
                else:
                    self.state = state
                return True
        if rest.startswith((TOOL_CALL_OPEN, FUNCTION_OPEN)):  # the next call: this one lacked its end tags
            self.buf = rest
            self._end_call(out)
            return True
        if not final and any(m.startswith(rest) for m in _VALUE_END_FOLLOWERS):
            return False
        k = rest.find("<", 1)  # stray text inside a call is dropped
        self.buf = rest[k:] if k >= 0 else ""
        return k >= 0

    def _s_close(self, out, final):
        """After </function>: swallow an optional </tool_call>."""
        rest = self.buf.lstrip()
        if rest.startswith(TOOL_CALL_CLOSE):
            self.buf = rest[len(TOOL_CALL_CLOSE):]
        elif not final and TOOL_CALL_CLOSE.startswith(rest):
            return False
        else:
            self.buf = rest
        self._end_call(out)
        return True

    def _s_param_name(self, out, final):
        k = self.buf.find(">")
        if k < 0:
            if final:
                self.buf = ""
            return False
        call = self.call
        call.arg_name = self.buf[:k].strip()
        call.given.add(call.arg_name)
        call.quotes = 0
        schema = call.params.get(call.arg_name)
        call.arg_streams = is_string_param(schema)
        call.value, call.started_value = "", False
        self.buf = self.buf[k + 1:]
        self.state = "value"
        return True

    def _s_value(self, out, final):
        call = self.call
        if not call.started_value:  # the value starts after one newline
            if not self.buf and not final:
                return False
            if self.buf.startswith("\n"):
                self.buf = self.buf[1:]
            call.started_value = True
            self._open_arg(out)
        while True:
            hits = [(k, m) for m in _VALUE_MARKERS if (k := self.buf.find(m)) >= 0]
            if not hits:
                if not final:
                    self._emit_value(out, len(self.buf) - _partial_suffix(self.buf, *_VALUE_MARKERS))
                return False
            k, marker = min(hits)
            ends = self._ends_value(marker, self.buf[k + len(marker):], final)
            if ends is None:  # wait to see what follows this tag
                self._emit_value(out, k)
                return False
            if ends:
                self._end_value(out, self.buf[:k])
                self.buf = self.buf[k + len(marker):] if marker == PARAM_CLOSE else self.buf[k:]
                self.state = "params"
                return True
            if marker == FUNCTION_OPEN:
                call.quotes += 1
            elif marker == FUNCTION_CLOSE:
                call.quotes = max(0, call.quotes - 1)
            self._emit_value(out, k + len(marker))  # the tag is text

    # ---- deciding where a value ends: True, False, or None while the text so far cannot tell ----
    def _ends_value(self, marker: str, rest: str, final: bool) -> Optional[bool]:
        """Does the value end at this tag? `rest` is the text after it."""
        call = self.call
        if marker == FUNCTION_OPEN:
            return False
        if marker == PARAM_OPEN:
            return False if call.quotes else self._new_param(rest, final, closed=False)
        if marker == FUNCTION_CLOSE:
            return self._call_ends(rest, final)
        after = rest.lstrip()  # after </parameter>
        if not after:
            return True if final else None
        if after.startswith(PARAM_OPEN):
            return self._new_param(after[len(PARAM_OPEN):], final, closed=True)
        if after.startswith(FUNCTION_CLOSE):
            return self._call_ends(after[len(FUNCTION_CLOSE):], final)
        if after.startswith(TOOL_CALL_CLOSE):
            return True if not call.quotes else self._next_call(after[len(TOOL_CALL_CLOSE):], final)
        if not final and any(m.startswith(after) for m in _VALUE_END_FOLLOWERS):
            return None
        return self._next_call(after, final)

    def _new_param(self, rest: str, final: bool, closed: bool) -> Optional[bool]:
        """After `<parameter=`: a parameter the tool has and was not given yet. After a closed
        value that is not a string, any name not given yet (markup is no text there)."""
        name, call = _tag_name(rest, final), self.call
        if not name:
            return None if name is None else False
        known = not call.params or name in call.params or (closed and not call.arg_streams)
        return known and name not in call.given

    def _call_ends(self, rest: str, final: bool) -> Optional[bool]:
        """After `</function>` inside a value: the call's end if `</tool_call>` (of a call that
        opened with one), the next call or the end of the output follows; inside a quoted call,
        only the next call or the end."""
        call, after = self.call, rest.lstrip()
        if not call.quotes and not call.wrapped:
            return True
        if after.startswith(TOOL_CALL_CLOSE):
            if not call.quotes:
                return True
            after = after[len(TOOL_CALL_CLOSE):]
        elif after and TOOL_CALL_CLOSE.startswith(after) and not final:
            return None
        return self._next_call(after, final)

    def _next_call(self, rest: str, final: bool) -> Optional[bool]:
        """Is `rest` the end of the output or the start of a call to an offered tool?"""
        rest = rest.lstrip()
        if rest.startswith(TOOL_CALL_OPEN):
            rest = rest[len(TOOL_CALL_OPEN):].lstrip()
        if not rest:
            return True if final else None
        if rest.startswith(FUNCTION_OPEN):
            name = _tag_name(rest[len(FUNCTION_OPEN):], final)
            if not name:
                return None if name is None else False
            return not self.schemas or name in self.schemas
        if not final and any(m.startswith(rest) for m in (TOOL_CALL_OPEN, FUNCTION_OPEN)):
            return None
        return False

    def _s_json(self, out, final):
        """The JSON form ends at the first </tool_call> outside a JSON string."""
        k = next((m.start() for m in _JSON_TOKEN.finditer(self.buf) if m.group() == TOOL_CALL_CLOSE), -1)
        if k < 0:
            return False
        body = self.buf[:k]
        self.buf = self.buf[k + len(TOOL_CALL_CLOSE):]
        self._finish_json(out, body, final=False, closed=True)
        return True

    # ---- emitting ----
    def _open_arg(self, out):
        call = self.call
        sep = "{" if call.num_args == 0 else ", "
        call.num_args += 1
        frag = f"{sep}{_dumps(call.arg_name)}: "
        if call.arg_streams:
            frag += '"'
        out.append(CallArgs(call.index, frag))

    def _emit_value(self, out, n: int):
        """Move buf[:n] into the value, keeping a trailing newline back (it may be the separator).
        Strings stream; other types wait for the whole value."""
        if self.buf[:n].endswith("\n"):
            n -= 1
        text, self.buf = self.buf[:n], self.buf[n:]
        if not text:
            return
        if self.call.arg_streams:
            out.append(CallArgs(self.call.index, _dumps(text)[1:-1]))
        else:
            self.call.value += text

    def _end_value(self, out, text: str):
        call = self.call
        if not call.started_value:
            call.started_value = True
            text = text[1:] if text.startswith("\n") else text
            self._open_arg(out)
        if text.endswith("\n"):
            text = text[:-1]
        if call.arg_streams:
            out.append(CallArgs(call.index, _dumps(text)[1:-1] + '"'))
        else:
            raw = call.value + text
            value = coerce_value(raw, call.params.get(call.arg_name))
            out.append(CallArgs(call.index, _dumps(value)))
        call.value = ""

    def _end_call(self, out):
        call = self.call
        out.append(CallArgs(call.index, "{}" if call.num_args == 0 else "}"))
        out.append(CallEnd(call.index))
        self.call = None
        self.state = "text"

    def _finish_json(self, out, body: str, final: bool, closed: bool = False):
        """The JSON form: one object with name and arguments (or parameters)."""
        try:
            obj = json.loads(body.strip())
        except ValueError:
            obj = None
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or not name:
            out.append(Text(self.pending_open + body + (TOOL_CALL_CLOSE if closed else "")))
            self.pending_open, self.state = "", "text"
            return
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        index, call_id = self.counter.take()
        out.append(CallStart(index, call_id, name))
        out.append(CallArgs(index, _dumps(args if args is not None else {})))
        out.append(CallEnd(index))
        self.pending_open, self.state = "", "text"


def _merge(events: list[Event]) -> list[Event]:
    """Join adjacent text and adjacent argument fragments of the same call; drop empty text."""
    out: list[Event] = []
    for e in events:
        if isinstance(e, Text):
            if not e.text:
                continue
            if out and isinstance(out[-1], Text):
                out[-1] = Text(out[-1].text + e.text)
                continue
        elif isinstance(e, CallArgs) and out and isinstance(out[-1], CallArgs) and out[-1].index == e.index:
            out[-1] = CallArgs(e.index, out[-1].fragment + e.fragment)
            continue
        out.append(e)
    return out


@dataclass
class ParsedCalls:
    content: str = ""
    calls: dict[int, ToolCall] = field(default_factory=dict)  # by index, in order of appearance

    def add(self, events: list[Event]) -> "ParsedCalls":
        for e in events:
            if isinstance(e, Text):
                self.content += e.text
            elif isinstance(e, CallStart):
                self.calls[e.index] = ToolCall(e.id, e.name, "")
            elif isinstance(e, CallArgs):
                self.calls[e.index].arguments += e.fragment
        return self


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> ParsedCalls:
    """Whole-text parse: the same machine, fed once."""
    parser = ToolCallParser(tools)
    return ParsedCalls().add(parser.feed(text) + parser.finish())
