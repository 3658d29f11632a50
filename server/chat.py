"""Chat messages -> the prompt, rendered by the checkpoint's own chat template."""

from __future__ import annotations

import inspect
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import BadRequest
from .protocol import Message, TextPart, Tool

# Names a template sees besides chat_template_kwargs, which would replace them: jinja's globals,
# filters and tests, transformers' additions, and what the renderer passes itself (the template's
# variables, apply_chat_template's own parameters, the tokenizer's special tokens)
_ENV = ImmutableSandboxedEnvironment()
_TEMPLATE_NAMES = (set(_ENV.globals) | set(_ENV.filters) | set(_ENV.tests)
                   | {"raise_exception", "strftime_now", "messages", "tools", "documents", "add_generation_prompt"})


def _reserved_kwargs(tokenizer) -> set[str]:
    params = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    own = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    specials = set(getattr(tokenizer, "special_tokens_map", {}))
    specials |= set(getattr(tokenizer, "SPECIAL_TOKENS_ATTRIBUTES", ()))
    return _TEMPLATE_NAMES | own | specials


def _text_content(m: Message, where: str) -> Any:
    if m.content is None or isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if not isinstance(part, TextPart):
            raise BadRequest(f"{where}.content[{j}]: content of type {part.type!r} is not supported "
                             "(this model reads text only)", param=f"{where}.content")
        texts.append(part.text)
    return "".join(texts)


def _arguments(raw: str | dict, where: str) -> dict:
    """Tool-call arguments as the template needs them: an object (clients send a JSON string)."""
    if isinstance(raw, dict):
        return raw
    try:
        args = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise BadRequest(f"{where}: not valid JSON ({e})", param=where) from None
    if not isinstance(args, dict):
        raise BadRequest(f"{where}: must encode a JSON object", param=where)
    return args


LATER_SYSTEM_PREFIX = "System: "


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as the template takes them. Qwen3.5's template takes one system message, first:
    the leading system and developer messages are merged into it (blank-line separated), and a
    later one becomes a user turn that says where it comes from ("System: ...")."""
    out, leading = [], True
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        leading = leading and m.role in ("system", "developer")
        if m.role in ("system", "developer"):
            content = _text_content(m, where)
            if leading:
                if out:
                    out[0]["content"] += "\n\n" + content
                else:
                    out.append({"role": "system", "content": content})
            else:
                out.append({"role": "user", "content": LATER_SYSTEM_PREFIX + content})
            continue
        msg: dict[str, Any] = {"role": m.role, "content": _text_content(m, where)}
        if m.name is not None:
            msg["name"] = m.name
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": _arguments(c.function.arguments,
                                                          f"{where}.tool_calls[{j}].function.arguments")}}
                    for j, c in enumerate(m.tool_calls)
                ]
        if m.role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def template_takes_tools(tokenizer) -> bool:
    """Whether the checkpoint's chat template renders a `tools` list (Qwen3.5's does); without a
    template at all, render_prompt gives the error."""
    template = getattr(tokenizer, "chat_template", None)
    return not isinstance(template, str) or "tools" in template


def template_tools(tools: list[Tool] | None) -> list[dict] | None:
    if not tools:
        return None
    return [t.model_dump(exclude_none=True, by_alias=True) for t in tools]


def render_prompt(tokenizer, messages: list[Message], tools: list[Tool] | None,
                  template_kwargs: dict | None = None) -> str:
    kwargs = dict(template_kwargs or {})
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("this model has no chat template; use /v1/completions")
    bad = sorted(set(kwargs) & _reserved_kwargs(tokenizer)) if kwargs else []
    if bad:
        raise BadRequest(f"chat_template_kwargs may not set {', '.join(bad)} (the template's own names)",
                         param="chat_template_kwargs")
    try:
        return _apply_template(tokenizer, messages, tools, kwargs, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise BadRequest(f"the chat template rejected the messages: {e}", param="messages") from None
    except (TypeError, ValueError) as e:  # e.g. a template kwarg of a type the template cannot use
        raise BadRequest(f"the chat template could not render this request: {e}") from None


def _apply_template(tokenizer, messages: list[Message], tools: list[Tool] | None, kwargs: dict | None,
                    add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(template_messages(messages), tools=template_tools(tools),
                                         add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **dict(kwargs or {}))


def history_end(tokenizer, messages: list[Message], tools: list[Tool] | None, template_kwargs: dict | None,
                prompt: str, ids: list[int]) -> int | None:
    """The token offset in `ids` (the encoded `prompt`) where the rendered history ends and the
    generation prompt begins, or None where the template does not split that way.

    The next turn of this chat shares its tokens up to here and no further: templates like
    Qwen3.5's render a finished assistant turn differently from the generation prompt and the
    generated text (its reasoning dropped), so a snapshot here is what the next turn resumes from."""
    try:
        history = _apply_template(tokenizer, messages, tools, template_kwargs, add_generation_prompt=False)
    except (jinja2.TemplateError, TypeError, ValueError):
        return None
    if not history or not prompt.startswith(history) or len(history) == len(prompt):
        return None
    tail = encode_prompt(tokenizer, prompt[len(history):])
    start = len(ids) - len(tail)
    return start if 0 < start and ids[start:] == tail else None


def system_end(tokenizer, messages: list[Message], tools: list[Tool] | None, template_kwargs: dict | None,
               prompt: str, ids: list[int]) -> int | None:
    """The token offset in `ids` where the leading system (and developer) messages and the tools end,
    with the next user turn's header: what every conversation with the same system prompt and tools
    shares. None where the request has none, or the template does not render them as a prefix.

    Found as where two renderings that differ only in a probe user message part: templates may
    refuse a system message alone (Qwen3's "No user query found")."""
    k = 0
    while k < len(messages) and messages[k].role in ("system", "developer"):
        k += 1
    if (k == 0 and not tools) or k == len(messages) or messages[k].role != "user":
        return None
    try:
        a, b = (_apply_template(tokenizer, [*messages[:k], Message(role="user", content=probe)], tools,
                                template_kwargs, add_generation_prompt=False) for probe in ("A", "B"))
    except (jinja2.TemplateError, TypeError, ValueError):
        return None
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if n == 0 or not prompt.startswith(a[:n]):
        return None
    # the header's last token may merge with the text after it ("\n" + "Write" is one token in
    # some vocabularies): the tokens every such conversation shares end where ids and head part
    head = encode_prompt(tokenizer, a[:n])
    m = next((i for i, (x, y) in enumerate(zip(head, ids)) if x != y), min(len(head), len(ids)))
    return m if 0 < m < len(ids) else None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The rendered template already holds every special token; add none."""
    return list(tokenizer.encode(prompt, add_special_tokens=False))
