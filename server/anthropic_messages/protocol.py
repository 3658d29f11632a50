"""The Anthropic Messages wire protocol (requests), as the anthropic SDK sends it, with limits on
every field. Unknown fields are tolerated (`cache_control`, `metadata`, betas' additions); a
malformed known block fails validation, which the router turns into a 400 naming the field the
way Anthropic does (`messages.0.content.1.tool_use_id`).

Responses are plain dicts built in fold.py: their shapes are the SDK's `Message` and
`RawMessageStreamEvent` types, which the tests validate them against."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from server.protocol import MAX_STOP, MAX_TOOLS

MAX_MESSAGES = 100_000  # Anthropic's own limit


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- content blocks

class TextBlock(_Request):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]


class ThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None  # ours are empty; whatever comes back is accepted unread


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]


class OtherBlock(_Request):
    """Any other block type (image, document, server tools' blocks): refused by translate.py with
    a message naming it, rather than by a validation error listing every type we know."""

    type: str


def _block_kind(block: Any) -> str:
    kind = block.get("type") if isinstance(block, dict) else getattr(block, "type", None)
    return _KINDS.get(kind, "Other") if isinstance(kind, str) else "Other"  # OtherBlock refuses a non-string


# Tags start with a capital so that error paths leave them out
_KINDS = {"text": "Text", "tool_use": "ToolUse", "tool_result": "ToolResult", "thinking": "Thinking",
          "redacted_thinking": "RedactedThinking"}

ResultContent = Annotated[Union[Annotated[TextBlock, Tag("Text")], Annotated[OtherBlock, Tag("Other")]],
                          Discriminator(lambda b: "Text" if _block_kind(b) == "Text" else "Other")]


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: Union[str, list[ResultContent], None] = None
    is_error: bool = False


Block = Annotated[
    Union[Annotated[TextBlock, Tag("Text")], Annotated[ToolUseBlock, Tag("ToolUse")],
          Annotated[ToolResultBlock, Tag("ToolResult")], Annotated[ThinkingBlock, Tag("Thinking")],
          Annotated[RedactedThinkingBlock, Tag("RedactedThinking")], Annotated[OtherBlock, Tag("Other")]],
    Discriminator(_block_kind),
]


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


# ---------------------------------------------------------------- tools and options

class ToolDef(_Request):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[str] = None  # "custom" or absent; server tools (web_search_..., bash_...) are refused
    strict: Optional[bool] = None


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError('a "tool" tool_choice needs a name, and only it takes one')
        return self


class Thinking(_Request):
    """Mapped onto the chat template's thinking switch; budget_tokens is not enforced (the model
    ends its reasoning itself, within max_tokens)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = Field(default=None, ge=1)


class OutputFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Request):
    format: Optional[OutputFormat] = None


# ---------------------------------------------------------------- requests

class CountTokensRequest(_Request):
    """What decides the prompt: the body of /v1/messages/count_tokens, and the core of /v1/messages."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: Union[str, list[Block], None] = None
    tools: Optional[list[ToolDef]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None

    @model_validator(mode="after")
    def _choice_fits_tools(self):
        choice = self.tool_choice
        if choice is None or choice.type in ("auto", "none"):
            return self
        names = [t.name for t in self.tools or []]
        if not names:
            raise ValueError(f'tool_choice "{choice.type}" needs tools')
        if choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names tool {choice.name!r}, which is not in tools")
        return self


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(default=None, max_length=MAX_STOP)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    stream: bool = False
    metadata: Optional[dict[str, Any]] = None


# ---------------------------------------------------------------- errors

# Anthropic's error types by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
