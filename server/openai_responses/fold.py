"""A Generation's deltas folded into a Response: output items (reasoning, message, function_call)
and, for streaming, the documented events with a sequence_number on each. The whole response is
the stream's last event, so streamed and non-streamed responses come from the same fold."""

from __future__ import annotations

import copy
from typing import Callable, Optional

from server.engine import Delta
from server.output import Piece
from server.protocol import new_id
from server.serving import Job

from .protocol import ResponsesRequest

_STATUS = {"stop": "completed", "length": "incomplete"}  # any other finish reason: failed


def base_response(req: ResponsesRequest, job: Job, store: bool) -> dict:
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    return {
        "id": new_id("resp", "_"), "object": "response", "created_at": job.created, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "model": job.model, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "store": store, "temperature": job.params.temperature, "text": {"format": fmt or {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
        "top_p": job.params.top_p, "truncation": req.truncation or "disabled", "usage": None, "user": req.user,
        "metadata": req.metadata or {},
    }


class ResponseFold:
    """parser: the job's ChatOutputParser; read: a delta -> its pieces through that parser (the
    chat routes' own reading, so stopping rules apply here as there)."""

    def __init__(self, response: dict, parser, read: Callable[[Delta], list[Piece]]):
        self.response = response
        self.parser = parser
        self.read = read
        self.seq = 0
        self.item: Optional[dict] = None  # the output item now streaming
        self.reasoning_tokens = 0

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self) -> dict:
        return copy.deepcopy(self.response)

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def add(self, d: Delta) -> list[dict]:
        thinking = self._thinking()
        pieces = self.read(d)
        if thinking or self._thinking():
            self.reasoning_tokens += len(d.token_ids)  # the </think> markup counts as reasoning
        events = [e for p in pieces for e in self._piece(p)]
        if d.finish_reason is not None:
            events += self._finish(d)
        return events

    def _thinking(self) -> bool:
        return self.parser.in_reasoning

    # ------------------------------------------------------------ items

    def _open(self, item: dict, part: Optional[dict]) -> list[dict]:
        self.item = item
        self.response["output"].append(item)
        index = len(self.response["output"]) - 1
        events = [self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item))]
        if part is not None:
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part=dict(part)))
            item["content"].append(part)
        return events

    def _close(self, status: str) -> list[dict]:
        item, self.item = self.item, None
        if item is None:
            return []
        index = len(self.response["output"]) - 1
        where = {"item_id": item["id"], "output_index": index}
        item["status"] = status
        if item["type"] == "function_call":
            events = [self._event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"])]
        else:
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            events = [self._event(done, **where, content_index=0, text=part["text"], **extra),
                      self._event("response.content_part.done", **where, content_index=0, part=dict(part))]
        return events + [self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]

    def _piece(self, p: Piece) -> list[dict]:
        events: list[dict] = []
        if p.channel == "tool_call":
            c = p.call
            if c.name is not None:
                events += self._close("completed")
                events += self._open({"id": new_id("fc", "_"), "type": "function_call", "status": "in_progress",
                                      "call_id": c.id, "name": c.name, "arguments": ""}, None)
            if c.arguments:
                self.item["arguments"] += c.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=self.item["id"],
                                          output_index=len(self.response["output"]) - 1, delta=c.arguments))
            return events
        kind = "message" if p.channel == "content" else "reasoning"
        if self.item is None or self.item["type"] != kind:
            events += self._close("completed")
            if kind == "message":
                events += self._open({"id": new_id("msg", "_"), "type": "message", "status": "in_progress",
                                      "role": "assistant", "content": []},
                                     {"type": "output_text", "text": "", "annotations": []})
            else:
                events += self._open({"id": new_id("rs", "_"), "type": "reasoning", "status": "in_progress",
                                      "summary": [], "content": []}, {"type": "reasoning_text", "text": ""})
        self.item["content"][0]["text"] += p.text
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(delta, item_id=self.item["id"], output_index=len(self.response["output"]) - 1,
                                  content_index=0, delta=p.text, **extra))
        return events

    # ------------------------------------------------------------ the end

    def _finish(self, d: Delta) -> list[dict]:
        status = _STATUS.get(d.finish_reason, "failed")
        if status == "incomplete" and self.parser.done:
            status = "completed"  # the parser ended the answer (parallel_tool_calls false) as the length ran out
        events = self._close("completed" if status == "completed" else "incomplete")
        r = self.response
        r["status"] = status
        if status == "incomplete":
            r["incomplete_details"] = {"reason": "max_output_tokens"}
        if status == "failed":
            r["error"] = {"code": "server_error", "message": f"generation ended early ({d.finish_reason})"}
        u = d.usage
        if u is not None:
            r["usage"] = {"input_tokens": u.prompt_tokens,
                          # cache_write_tokens prices explicit cache writes; ours are a free side effect
                          "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                          "output_tokens": u.completion_tokens,
                          "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens,
                                                                            u.completion_tokens)},
                          "total_tokens": u.total_tokens}
        return events + [self._event(f"response.{status}", response=self._snapshot())]
