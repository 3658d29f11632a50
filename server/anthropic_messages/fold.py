"""A Generation's deltas -> Anthropic's stream events, and the Message they add up to.

The chat output parser's pieces become content blocks: reasoning a `thinking` block, content a
`text` block, each tool call a `tool_use` block; a new block starts where the kind changes. The
whole (non-streamed) message is folded from the same events, so both answers agree.

Usage follows Anthropic's arithmetic: input_tokens + cache_read_input_tokens is the prompt, the
second being what the prefix cache served. message_start can only give the prompt's length (the
cache lookup happens in the engine); message_delta carries the final split, which the SDK takes."""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional

from server.engine import Delta
from server.serving import Generation, finish_reason

Event = tuple[str, dict]  # (SSE event name, data)


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(call_id: str) -> str:
    """Our call ids (call_...) in Anthropic's form."""
    return "toolu_" + call_id.removeprefix("call_")


def _usage(d: Delta) -> dict:
    u = d.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}


class MessageFold:
    def __init__(self, gen: Generation, message_id: str, model: str, stops: list[str]):
        """stops: the request's stop sequences, to tell which one ended the answer."""
        self.gen, self.parser = gen, gen.job.make_parser()
        self.message = {"id": message_id, "type": "message", "role": "assistant", "content": [], "model": model,
                        "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": len(gen.job.prompt_ids), "output_tokens": 0,
                                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        self.stops = stops
        self.open: Optional[tuple[str, int]] = None  # (block type, tool call index) of the block being written
        self.json: dict[int, str] = {}  # tool_use block index -> its input's JSON text so far
        self.pinged = False
        self.text, self.answer = "", ""  # all generated text, and the text blocks' (to find the stop sequence)

    def start(self) -> list[Event]:
        return [("message_start", {"type": "message_start", "message": json.loads(json.dumps(self.message))})]

    def add(self, d: Delta) -> list[Event]:
        """Events for one delta; the last delta ends the message. A generation that failed raises
        APIError (before or in the stream, the router answers it in Anthropic's error shape)."""
        self.text += d.text
        events = []
        for p in self.gen.pieces(self.parser, d):
            if p.channel == "tool_call":
                c = p.call
                if c.name is not None:
                    events += self._open("tool_use", c.index, {"type": "tool_use", "id": tool_use_id(c.id),
                                                               "name": c.name, "input": {}})
                assert self.open == ("tool_use", c.index), "a call's arguments follow its start"
                if c.arguments:
                    events.append(self._delta({"type": "input_json_delta", "partial_json": c.arguments}))
            elif p.channel == "reasoning":
                events += self._open("thinking", -1, {"type": "thinking", "thinking": "", "signature": ""})
                events.append(self._delta({"type": "thinking_delta", "thinking": p.text}))
            else:
                self.answer += p.text
                events += self._open("text", -1, {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": p.text}))
        if d.finish_reason is not None:
            events += self._finish(d)
        return events

    # ------------------------------------------------------------ blocks

    def _open(self, kind: str, call: int, block: dict) -> list[Event]:
        if self.open == (kind, call):
            return []
        events = self._close()
        self.open = (kind, call)
        self.message["content"].append(block)
        events.append(("content_block_start", {"type": "content_block_start", "index": self._index,
                                               "content_block": dict(block)}))
        if not self.pinged:  # where Anthropic's stream has its first ping
            self.pinged = True
            events.append(("ping", {"type": "ping"}))
        return events

    @property
    def _index(self) -> int:
        return len(self.message["content"]) - 1

    def _delta(self, delta: dict) -> Event:
        block = self.message["content"][self._index]
        if delta["type"] == "input_json_delta":
            self.json[self._index] = self.json.get(self._index, "") + delta["partial_json"]
        elif delta["type"] == "thinking_delta":
            block["thinking"] += delta["thinking"]
        else:
            block["text"] += delta["text"]
        return "content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}

    def _close(self) -> list[Event]:
        if self.open is None:
            return []
        self.open = None
        i = self._index
        if i in self.json:
            self.message["content"][i]["input"] = json.loads(self.json[i])
        return [("content_block_stop", {"type": "content_block_stop", "index": i})]

    # ------------------------------------------------------------ the end

    def _finish(self, d: Delta) -> list[Event]:
        events = self._close()
        if not self.pinged:
            events.append(("ping", {"type": "ping"}))
        calls = sum(b["type"] == "tool_use" for b in self.message["content"])
        reason = finish_reason(d, calls, self.parser.done)  # raises on an engine error or cancellation
        stop_sequence = self._stop_sequence() if reason == "stop" and self.parser.done else None
        stop_reason = {"tool_calls": "tool_use", "length": "max_tokens"}.get(
            reason, "stop_sequence" if self.parser.done else "end_turn")
        usage = _usage(d)
        self.message.update(stop_reason=stop_reason, stop_sequence=stop_sequence, usage=usage)
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                         "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _stop_sequence(self) -> Optional[str]:
        """Which stop sequence ended the answer: the parser matches them in the answer (after the
        reasoning, outside tool-call markup) and cuts it where one begins, so it is the one found
        first after the answer's last characters (whitespace between them may have been trimmed)
        in the generated text after </think>."""
        region = self.text.rpartition("</think>")[2]
        for anchor in (re.escape(self.answer[-32:].rstrip()) + r"\s*", ""):
            found = [(m.end() - len(s), k, s) for k, s in enumerate(self.stops)
                     if (m := re.search(anchor + re.escape(s), region))]
            if found:
                return min(found)[2]
        return None
