"""The OpenAI wire protocol: every request and response body, with limits on every field, and
the one conversion from a request to engine SamplingParams.

Unknown request fields are tolerated (clients send many), and so is null for any field (it means
the default); wrong types and impossible values fail validation, which the app turns into a 400
naming the field. Every sampling parameter is range-checked here so that nothing a client sends
reaches the engine as an exception or as float32 arithmetic that overflows (a NaN row)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine import SamplingParams

MAX_STOP = 16
MAX_TOOLS = 256
MAX_JSON_DEPTH = 128
MIN_TEMPERATURE = 1e-2  # a positive temperature below this samples as this (vLLM's floor): logits / 1e-300 is inf
TOOL_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"  # OpenAI's rule; other names could break the tool-call markup

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def load_json(raw: bytes):
    """A request body's JSON. Raises ValueError for what json.loads accepts or chokes on but no
    later step can use: NaN and Infinity, nesting deeper than MAX_JSON_DEPTH (the recursion limit
    of rendering, validation and grammars), and lone UTF-16 surrogates ("\\ud800": no UTF-8 text
    holds them, so the tokenizer and the response encoder fail on them)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
            items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
            for k, v in items:
                if surrogates and k is not None:
                    stack.append((k, depth))
                stack.append((v, depth + 1))
        elif surrogates and isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"a string holds a lone UTF-16 surrogate: {value[:40]!r}") from None
    return data


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """OpenAI reads an explicit null as "not given" (clients send `"n": null` and the like)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- requests: pieces

class TextPart(_Request):
    type: Literal["text"]
    text: str


class OtherPart(_Request):
    type: str


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: Union[str, dict[str, Any]] = "{}"  # clients send a JSON string; some send an object


class ToolCallIn(_Request):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, OtherPart]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.role in ("user", "tool", "system", "developer") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role != "assistant" and self.tool_calls:
            raise ValueError("only assistant messages may carry tool_calls")
        return self


class FunctionDef(_Request):
    name: str = Field(pattern=TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v):
        """The parts of the schema our own code reads (the tool-call grammar, the parser)."""
        if v is None:
            return v
        props = v.get("properties")
        if props is not None and not (isinstance(props, dict)
                                      and all(isinstance(p, (dict, bool)) for p in props.values())):
            raise ValueError("properties must be an object of JSON schemas")
        required = v.get("required")
        if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise ValueError("required must be a list of property names")
        return v


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(_Request):
    name: str = "response"
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaSpec] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class StreamOptions(_Request):
    include_usage: bool = False


# ---------------------------------------------------------------- requests

class _Sampling(_Request):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1, lt=2**31)  # -1 or 0: off (vLLM uses -1)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    # vLLM's int64 range and the sampler's uint64 one, reduced modulo 2**64 (-1 samples as 2**64 - 1)
    seed: Optional[int] = Field(default=None, ge=-(2**63), lt=2**64)
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = Field(default=None, max_length=64)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    logit_bias: Optional[dict[str, float]] = Field(default=None, max_length=1024)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not re.fullmatch(r"[0-9]{1,10}", key):  # "²".isdigit() holds, and int() fails on it
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Tool]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, "
                                 "which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


def _temperature(t: Optional[float]) -> float:
    if t is None:
        return 1.0
    return max(t, MIN_TEMPERATURE) if t > 0 else 0.0


def sampling_params(req: _Sampling, max_tokens: int, logprobs: bool, top_logprobs: int,
                    processors: list) -> SamplingParams:
    """The one conversion from a request to what the engine runs."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_temperature(req.temperature),
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=None if req.seed is None else req.seed % 2**64,
        stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logits_processors=processors,
    )


# ---------------------------------------------------------------- responses

def new_id(prefix: str, sep: str = "-") -> str:
    """chatcmpl-…; the Responses API spells its ids resp_…, msg_…, fc_… (sep "_")."""
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class FunctionOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Response):
    content: Optional[list[TokenLogprobOut]] = None


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None  # the same text: clients read one name or the other
    tool_calls: Optional[list[ToolCallOut]] = None  # absent when the reply calls no tool, as OpenAI


class ChatChoice(_Response):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class FunctionDelta(_Response):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDeltaOut(_Response):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionDelta


class ChunkDelta(_Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: Optional[list[ToolCallDeltaOut]] = None


class ChunkChoice(_Response):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionLogprobs(_Response):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    max_model_len: Optional[int] = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(_Response):
    error: ErrorBody


def dump_chunk(chunk: BaseModel, usage_null: bool = False) -> str:
    """Chunks leave out empty fields but keep finish_reason (null until the end), as OpenAI does;
    with stream_options.include_usage every chunk but the last carries "usage": null."""
    data = chunk.model_dump(exclude_none=True)
    for choice in data.get("choices", []):
        choice.setdefault("finish_reason", None)
    if usage_null:
        data.setdefault("usage", None)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
