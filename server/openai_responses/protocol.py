"""The Responses wire protocol: request bodies with limits on every field, as the openai SDK sends
them. Unknown fields are tolerated, as on the chat routes; input items are checked one by one in
translate.py, where an item of a kind we cannot serve gets a 400 naming it."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_ITEMS = 4096
MAX_TOOLS = 256


class _In(BaseModel):
    model_config = ConfigDict(extra="allow")


class FormatSpec(_In):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field(default="response", max_length=256)
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class TextConfig(_In):
    format: Optional[FormatSpec] = None


class ReasoningConfig(_In):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[str] = None


class ResponsesRequest(_In):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]] = Field(default_factory=list)
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = Field(default=None, max_length=256)
    tools: Optional[list[dict[str, Any]]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stream: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = Field(default=None, max_length=16)
    user: Optional[str] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # as on chat completions (vLLM's extension)
    background: Optional[bool] = None
    conversation: Union[str, dict[str, Any], None] = None

    @field_validator("input")
    @classmethod
    def _few_items(cls, v):
        if isinstance(v, list) and len(v) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} input items, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _served_here(self):
        # both would be silently wrong if ignored: no polling queue, no Conversations API here
        if self.background:
            raise ValueError("background responses are not supported; stream, or wait for the response")
        if self.conversation is not None:
            raise ValueError("conversation is not supported (no Conversations API here); use previous_response_id "
                             "or send the history as input")
        return self
