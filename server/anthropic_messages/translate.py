"""An Anthropic Messages request -> the chat-completions request that the one generation path runs.

`system` becomes the leading system message. A user turn's `tool_result` blocks become tool
messages (an `is_error` result reads "Error: ..." to the model) and its text blocks a user
message, in their order; an assistant turn's text blocks become its content, its `tool_use`
blocks its tool calls and its `thinking` blocks its reasoning_content. Anthropic's tool_choice
`any` is chat's `required`, `tool` a named function, and `disable_parallel_tool_use` is
`parallel_tool_calls: false`; `thinking` sets the template's `enable_thinking`."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from server.errors import BadRequest
from server.protocol import ChatCompletionRequest

from .protocol import (
    Block, CountTokensRequest, MessagesRequest, OtherBlock, RedactedThinkingBlock, TextBlock, ThinkingBlock,
    ToolResultBlock, ToolUseBlock,
)

ERROR_PREFIX = "Error: "


def _refuse(block: Block, where: str) -> BadRequest:
    if isinstance(block, OtherBlock) and block.type in ("image", "document"):
        why = "this model reads text only"
    else:
        why = "not supported here"
    return BadRequest(f"{where}: a {block.type!r} block is not supported ({why})", param=where)


def _text_parts(blocks: list[Block], where: str) -> list[dict]:
    parts = []
    for j, b in enumerate(blocks):
        if not isinstance(b, TextBlock):
            raise _refuse(b, f"{where}.{j}")
        parts.append({"type": "text", "text": b.text})
    return parts


def _tool_message(block: ToolResultBlock, where: str) -> dict:
    content = block.content
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = "".join(p["text"] for p in _text_parts(content, f"{where}.content"))
    if block.is_error:
        content = ERROR_PREFIX + content
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _user_turn(blocks: list[Block], where: str) -> list[dict]:
    out, texts = [], []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            texts.append({"type": "text", "text": b.text})
        elif isinstance(b, ToolResultBlock):
            if texts:
                out.append({"role": "user", "content": texts})
                texts = []
            out.append(_tool_message(b, f"{where}.{j}"))
        else:
            raise _refuse(b, f"{where}.{j}")
    if texts or not out:
        out.append({"role": "user", "content": texts})
    return out


def _assistant_turn(blocks: list[Block], where: str) -> dict:
    texts, calls, reasoning = [], [], []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            texts.append({"type": "text", "text": b.text})
        elif isinstance(b, ToolUseBlock):
            calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
        elif isinstance(b, ThinkingBlock):
            reasoning.append(b.thinking)
        elif not isinstance(b, RedactedThinkingBlock):  # opaque to us: dropped
            raise _refuse(b, f"{where}.{j}")
    msg: dict[str, Any] = {"role": "assistant", "content": texts or None}
    if calls:
        msg["tool_calls"] = calls
    if reasoning:
        msg["reasoning_content"] = "\n\n".join(reasoning)
    return msg


def chat_messages(req: CountTokensRequest) -> list[dict]:
    out = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _text_parts(req.system, "system")
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            out += _user_turn(m.content, where)
        else:
            out.append(_assistant_turn(m.content, where))
    if req.messages[-1].role == "assistant":
        raise BadRequest("the last message is the assistant's: continuing a prefilled assistant turn is not "
                         "supported; end with a user message", param=f"messages.{len(req.messages) - 1}")
    return out


def _tools(req: CountTokensRequest) -> Optional[list[dict]]:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type not in (None, "custom"):
            raise BadRequest(f"tools.{i}: {t.type!r} is an Anthropic server tool; this server offers the model "
                             "custom tools only (name, description, input_schema)", param=f"tools.{i}.type")
        fn = {"name": t.name, "description": t.description, "parameters": t.input_schema}
        if t.strict is not None:
            fn["strict"] = t.strict
        tools.append({"type": "function", "function": fn})
    return tools or None


def _tool_choice(req: CountTokensRequest) -> dict:
    choice = req.tool_choice
    if choice is None:
        return {}
    out: dict[str, Any] = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)}
    if choice.type == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


def _options(req: CountTokensRequest) -> dict:
    out: dict[str, Any] = {}
    if req.thinking is not None:
        out["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    fmt = req.output_config.format if req.output_config else None
    if fmt is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    return out


def chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "tools": _tools(req),
                            **_tool_choice(req), **_options(req)}
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stop=req.stop_sequences, temperature=req.temperature,
                    top_p=req.top_p, top_k=req.top_k, stream=req.stream)
        user = (req.metadata or {}).get("user_id")
        if isinstance(user, str):
            body["user"] = user
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:  # what our limits refuse and Anthropic's do not (e.g. a sampling range)
        err = e.errors()[0]
        raise BadRequest(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
