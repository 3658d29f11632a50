"""A chat response's generated text -> reasoning, content and tool calls, as stream pieces.

Reasoning splitting runs first; each channel then has its own tool-call parser (models do emit
calls inside <think>), sharing one call counter. Whitespace at the edges of each channel is
trimmed, in the stream and in the whole message alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

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

    def feed(self, text: str) -> str:
        if self.at_start:
            text = text.lstrip()
            if not text:
                return ""
            self.at_start = False
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return body


class ChatOutputParser:
    def __init__(self, *, reasoning: bool, starts_in_reasoning: bool, tools: list[dict] | None,
                 parse_tools: bool, make_id: Callable[[], str] = new_call_id):
        self.reasoning = ReasoningParser(starts_in_reasoning) if reasoning else None
        counter = CallCounter(make_id)
        channels = ("reasoning", "content") if parse_tools else ()
        self.tool_parsers = {ch: ToolCallParser(tools, counter) for ch in channels}
        self.trims = {"reasoning": _Trim(), "content": _Trim()}
        self.num_calls = 0

    def feed(self, text: str) -> list[Piece]:
        split = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        return _merge([p for ch, t in split for p in self._channel(ch, t, final=False)])

    def finish(self) -> list[Piece]:
        split = self.reasoning.finish() if self.reasoning else []
        pieces = [p for ch, t in split for p in self._channel(ch, t, final=False)]
        for ch in ("reasoning", "content"):
            pieces += self._channel(ch, "", final=True)
        return _merge(pieces)

    def _channel(self, channel: str, text: str, final: bool) -> list[Piece]:
        parser = self.tool_parsers.get(channel)
        if parser is None:
            events = [Text(text)] if text else []
        else:
            events = parser.finish() if final else parser.feed(text)
        out, trim = [], self.trims[channel]
        for e in events:
            if isinstance(e, Text):
                kept = trim.feed(e.text)
                if kept:
                    out.append(Piece(channel, kept))
            elif isinstance(e, CallStart):
                self.num_calls += 1
                out.append(Piece("tool_call", call=ToolCallDelta(e.index, e.id, e.name)))
            elif isinstance(e, CallArgs):
                out.append(Piece("tool_call", call=ToolCallDelta(e.index, arguments=e.fragment)))
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
