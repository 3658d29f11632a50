"""A chat response's generated text -> reasoning, content and tool calls, as stream pieces.

Reasoning splitting runs first; each channel then has its own tool-call parser (models do emit
calls inside <think>), sharing one call counter. Whitespace at the edges of each channel is
trimmed, in the stream and in the whole message alike. Stop sequences and parallel_tool_calls:
false end the answer here, where reasoning and markup are already told apart from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from server.engine.detokenizer import StopStrings

from .reasoning import ReasoningParser
from .tool_parser import CallArgs, CallCounter, CallStart, Text, ToolCall, ToolCallParser, new_call_id


@dataclass
class ToolCallDelta:
    index: int
    id: Optional[str] = None  # id and name come with the first delta of a call
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class Piece:
    """What one step adds: text of one channel, or one tool call's delta."""

    channel: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: Optional[ToolCallDelta] = None


class _Trim:
    """Drops whitespace at the start and end of a channel's text: trailing whitespace is held
    until more text comes, so whitespace before a tool call goes only if nothing follows."""

    def __init__(self):
        self.at_start = True
        self.pending = ""

    def lead(self, text: str) -> str:
        if self.at_start:
            text = text.lstrip()
            self.at_start = not text
        return text

    def tail(self, text: str) -> str:
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return body


class ChatOutputParser:
    """stops: stop sequences, matched in the content only (never in the reasoning, the blank
    lines after </think> or tool-call markup); max_calls: the calls allowed (1 for
    parallel_tool_calls false). Once either ends the answer, `done` is set and the rest of the
    text is dropped; the reader should stop the generation then."""

    def __init__(self, *, reasoning: bool, starts_in_reasoning: bool, tools: list[dict] | None,
                 parse_tools: bool, stops: list[str] = (), max_calls: Optional[int] = None,
                 make_id: Callable[[], str] = new_call_id):
        self.reasoning = ReasoningParser(starts_in_reasoning) if reasoning else None
        counter = CallCounter(make_id)
        channels = ("reasoning", "content") if parse_tools else ()
        self.tool_parsers = {ch: ToolCallParser(tools, counter) for ch in channels}
        self.trims = {"reasoning": _Trim(), "content": _Trim()}
        self.stops = StopStrings(list(stops))
        self.max_calls = max_calls
        self.num_calls = 0
        self.done = False

    @property
    def in_reasoning(self) -> bool:
        return self.reasoning is not None and self.reasoning.in_reasoning

    def feed(self, text: str) -> list[Piece]:
        if self.done:
            return []
        split = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        return _merge([p for ch, t in split for p in self._channel(ch, t, final=False)])

    def finish(self) -> list[Piece]:
        if self.done:
            return []
        split = self.reasoning.finish() if self.reasoning else []
        pieces = [p for ch, t in split for p in self._channel(ch, t, final=False)]
        for ch in ("reasoning", "content"):
            pieces += self._channel(ch, "", final=True)
        return _merge(pieces)

    def _channel(self, channel: str, text: str, final: bool) -> list[Piece]:
        """Stop sequences are matched in the content's text after its leading whitespace is
        trimmed (the template's blank lines after </think>) and before its trailing whitespace is
        held back (so the content never ends in whitespace before a stop sequence)."""
        if self.done:
            return []
        parser = self.tool_parsers.get(channel)
        if parser is None:
            events = [Text(text)] if text else []
        else:
            events = parser.finish() if final else parser.feed(text)
        out, trim = [], self.trims[channel]
        stops = self.stops if channel == "content" else None

        def add_text(text: str) -> None:
            kept = trim.tail(text)
            if kept:
                out.append(Piece(channel, kept))

        for e in events:
            if isinstance(e, Text):
                text, hit = stops.feed(trim.lead(e.text)) if stops else (trim.lead(e.text), False)
                add_text(text)
                if hit:
                    self.done = True
                    return out
            elif isinstance(e, CallStart):
                if self.max_calls is not None and self.num_calls >= self.max_calls:
                    self.done = True
                    return out
                self.num_calls += 1
                if stops:  # a stop sequence cannot run across a call
                    add_text(stops.flush())
                out.append(Piece("tool_call", call=ToolCallDelta(e.index, e.id, e.name)))
            elif isinstance(e, CallArgs):
                out.append(Piece("tool_call", call=ToolCallDelta(e.index, arguments=e.fragment)))
        if final and stops:
            add_text(stops.flush())
        return out


def _merge(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last and last.channel == p.channel != "tool_call":
            last.text += p.text
        elif last and p.channel == "tool_call" == last.channel and last.call.index == p.call.index:
            last.call.arguments += p.call.arguments
        else:
            out.append(p)
    return out


class AnswerLogprobs:
    """Keeps, of the logprobs of each step, those of the tokens whose text went into the content,
    so that `logprobs.content` adds up to `message.content`: reasoning and its markup, tool calls,
    trimmed whitespace and text past a stop sequence are left out (a token whose leading
    whitespace was trimmed is reported as the rest of its text). Tokens wait here until the
    parser lets their text out (it holds text back that may be markup or a stop sequence)."""

    def __init__(self):
        self.pending: list = []  # entries with a .token text
        self.partial = 0  # characters of pending[0]'s text already seen in the content
        self.skipped = 0  # its leading whitespace, trimmed from the content

    def step(self, parser: ChatOutputParser, entries: list, pieces: list[Piece]) -> list:
        if parser.in_reasoning:
            self.pending.clear()
            self.partial = self.skipped = 0
            return []
        self.pending += entries
        out = []
        for p in pieces:
            if p.channel == "content":
                out += self._match(p.text)
            else:
                self.pending.clear()  # what was not content so far is markup or reasoning
                self.partial = self.skipped = 0
        return out

    def _match(self, text: str) -> list:
        out, pos = [], 0
        while self.pending and pos < len(text):
            token = self.pending[0].token
            if self.partial == 0 and token[:1].isspace() and not text.startswith(token[:1], pos):
                self.skipped = self.partial = len(token) - len(token.lstrip())  # whitespace trimmed at the start
            rest = token[self.partial:]
            n = min(len(rest), len(text) - pos)
            if rest and text[pos:pos + n] == rest[:n]:
                pos += n
                self.partial += n
                if self.partial == len(token):  # the token's text is all out
                    entry = self.pending.pop(0)
                    if self.skipped:  # the part of it that is in the content
                        entry = entry.model_copy(update={"token": token[self.skipped:],
                                                         "bytes": list(token[self.skipped:].encode())})
                    out.append(entry)
                    self.partial = self.skipped = 0
            else:
                self.pending.pop(0)
                self.partial = self.skipped = 0
        return out


@dataclass
class ChatMessageParts:
    """The whole message, folded from pieces (the non-streaming response and tests use it)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: dict[int, ToolCall] = field(default_factory=dict)

    def add(self, pieces: list[Piece]) -> "ChatMessageParts":
        for p in pieces:
            if p.channel == "reasoning":
                self.reasoning += p.text
            elif p.channel == "content":
                self.content += p.text
            elif p.call.name is not None:
                self.tool_calls[p.call.index] = ToolCall(p.call.id, p.call.name, p.call.arguments)
            else:
                self.tool_calls[p.call.index].arguments += p.call.arguments
        return self
