"""A Responses request -> the chat-completions request that the one generation path runs.

Input items become chat messages: `message` items keep their role (developer is system to the
template), `function_call` items join the assistant turn before them as tool calls,
`function_call_output` items become tool messages and a `reasoning` item becomes the
reasoning_content of the assistant turn that follows it. `instructions` go first as a system
message; they belong to one request and are never carried over by previous_response_id."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from server.errors import BadRequest
from server.protocol import ChatCompletionRequest

from .protocol import ResponsesRequest

# reasoning.effort values that turn the template's thinking off
NO_THINKING = ("none", "minimal")
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _text(content: Any, where: str) -> str:
    """A string, or parts whose text is read (images and files are refused: the model reads text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}: must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise BadRequest(f"{where}[{j}]: content of type {kind!r} is not supported (this model reads text only)",
                             param=where)
    return "".join(texts)


def _field(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or (name != "arguments" and not value):
        raise BadRequest(f"{where}.{name}: a non-empty string is required", param=f"{where}.{name}")
    return value


def input_items(req: ResponsesRequest) -> list[dict]:
    """The request's input as a list of items (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return list(req.input)


def chat_messages(items: list[dict], instructions: Optional[str]) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    reasoning: Optional[str] = None  # a reasoning item waits for the assistant turn it belongs to

    def assistant_turn() -> dict:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or reasoning is not None:
            last = {"role": "assistant", "content": None}
            messages.append(last)
        if reasoning is not None:
            last["reasoning_content"], reasoning = reasoning, None
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: an input item must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"{where}.role: must be user, assistant, system or developer, got {role!r}",
                                 param=f"{where}.role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                turn = assistant_turn()
                turn["content"] = (turn["content"] or "") + text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where), "arguments": _field(item, "arguments", where)}}
            assistant_turn().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                             "content": _text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = _text(parts, f"{where}.content")
        else:
            raise BadRequest(f"{where}.type: input items of type {kind!r} are not supported (this server takes "
                             "message, function_call, function_call_output and reasoning items)",
                             param=f"{where}.type")
    return messages


def _tools(tools: Optional[list[dict]]) -> Optional[list[dict]]:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise BadRequest(f"tools[{i}]: the built-in tool {kind!r} is not supported; this server runs "
                             "function tools only", param=f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BadRequest(f"tools[{i}].name: a function tool needs a name", param=f"tools[{i}].name")
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise BadRequest(f"tools[{i}].parameters: must be a JSON schema object", param=f"tools[{i}].parameters")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise BadRequest(f"tool_choice of type {choice.get('type')!r} is not supported (use none, auto, required or "
                     '{"type": "function", "name": ...})', param="tool_choice")


def _response_format(req: ResponsesRequest) -> Optional[dict]:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    if fmt.schema_ is None:
        raise BadRequest("text.format json_schema needs a schema", param="text.format.schema")
    spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


def chat_request(req: ResponsesRequest, items: list[dict]) -> ChatCompletionRequest:
    """`items`: the whole conversation (a previous response's input and output, then this input)."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning is not None and req.reasoning.effort in NO_THINKING:
        kwargs["enable_thinking"] = False
    body = {
        "model": req.model,
        "messages": chat_messages(items, req.instructions),
        "tools": _tools(req.tools),
        "tool_choice": _tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req),
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": bool(req.stream),
        "chat_template_kwargs": kwargs or None,
    }
    if not body["messages"]:
        raise BadRequest("input: at least one input item is needed", param="input")
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise BadRequest(f"{where}: {msg}" if where else msg) from None
