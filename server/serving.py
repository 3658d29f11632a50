"""The one generation path: a request becomes a Job (prompt ids, sampling parameters, output
parser); `Generation` runs it on the engine; chat and completion responses, streamed or whole,
are folded from its deltas."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from server.engine import Delta, EngineStopped, PromptTooLong, QueueFull, SamplingParams, TokenLogprob

from .chat import encode_prompt, history_end, render_prompt, system_end, template_takes_tools
from .constrained import GrammarCompiler, LogitBias
from .errors import APIError, BadRequest, NotFound, TooManyRequests, Unavailable
from .metrics import Metrics, RequestTimer
from .output import ChatOutputParser, Piece
from .protocol import (
    ChatCompletionRequest, CompletionLogprobs, CompletionRequest, NamedToolChoice,
    TokenLogprobOut, TopLogprob, UsageInfo, PromptTokensDetails, new_id, now, sampling_params,
)
from .reasoning import prompt_opens_reasoning
from .settings import Settings

MIN_LOGPROB = -9999.0  # JSON has no -inf


class ModelNotFound(NotFound):
    type = "invalid_request_error"  # OpenAI's type for an unknown model, with a 404


@dataclass
class ServerState:
    settings: Settings
    engine: object
    tokenizer: object
    metrics: Metrics
    grammars: GrammarCompiler
    max_model_len: int
    started: int = 0
    _token_text: dict = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.settings.served_model_names:
            raise ModelNotFound(f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.settings.served_model_names))}",
                                param="model", code="model_not_found")


@dataclass
class Job:
    endpoint: str
    prompt_ids: list[int]
    params: SamplingParams
    model: str
    stream: bool
    include_usage: bool
    make_parser: Optional[Callable[[], ChatOutputParser]] = None
    echo_text: str = ""
    id: str = ""
    snapshot_at: tuple[int, ...] = ()  # where the prefix cache should keep the state (see chat.history_end)
    shared_at: tuple[int, ...] = ()  # those other conversations share (see chat.system_end)
    created: int = field(default_factory=now)


# ---------------------------------------------------------------- requests -> jobs

def _max_tokens(state: ServerState, requested: Optional[int], prompt_len: int) -> int:
    room = state.max_model_len - prompt_len
    if room < 1:
        raise BadRequest(f"this model's maximum context length is {state.max_model_len} tokens; the prompt "
                         f"has {prompt_len}", param="messages", code="context_length_exceeded")
    if requested is None:
        return min(state.settings.max_tokens, room)
    if requested > room:
        raise BadRequest(f"this model's maximum context length is {state.max_model_len} tokens; you asked for "
                         f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} to generate)",
                         param="max_tokens", code="context_length_exceeded")
    return requested


def _check_chars(state: ServerState, text: str, param: str) -> None:
    """Before tokenizing: a prompt too long to fit is refused without spending the tokenizer's time on it."""
    limit = state.settings.prompt_chars(state.max_model_len)
    if len(text) > limit:
        raise BadRequest(f"the prompt has {len(text)} characters, more than this server's limit of {limit} "
                         "(--max-prompt-chars)", param=param, code="context_length_exceeded")


def _logit_bias(state: ServerState, bias: Optional[dict[str, float]]) -> list:
    """The processor for logit_bias, whose token ids must be in the vocabulary (as OpenAI checks)."""
    if not bias:
        return []
    bad = [k for k in bias if int(k) >= state.grammars.vocab_size]
    if bad:
        raise BadRequest(f"logit_bias: token id {bad[0]} is outside the vocabulary ({state.grammars.vocab_size} "
                         "tokens)", param="logit_bias")
    return [LogitBias(bias)]


def _check_n(n: int) -> None:
    if n != 1:
        raise BadRequest("n > 1 is not supported; send separate requests", param="n")


def _tool_mode(state: ServerState, req: ChatCompletionRequest) -> tuple[str, Optional[str]]:
    """('none' | 'auto' | 'required' | 'named', the named function)."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if isinstance(choice, NamedToolChoice):
        return "named", choice.function.name
    if choice == "auto" and req.tools and not state.settings.enable_auto_tool_choice:
        raise BadRequest('"auto" tool choice is off on this server (--no-enable-auto-tool-choice); '
                         'send tool_choice "required", "none" or a named function', param="tool_choice")
    if choice != "none" and req.tools and not template_takes_tools(state.tokenizer):
        raise BadRequest("this model's chat template does not take tools", param="tools")
    return choice, None


async def chat_job(state: ServerState, req: ChatCompletionRequest) -> Job:
    state.check_model(req.model)
    _check_n(req.n)
    mode, named = _tool_mode(state, req)
    if mode in ("required", "named") and req.response_format and req.response_format.type != "text":
        raise BadRequest("response_format cannot be combined with tool_choice required or a named function",
                         param="response_format")
    tools = req.tools if mode != "none" else None
    kwargs = {**state.settings.chat_template_kwargs, **(req.chat_template_kwargs or {})}
    prompt = await asyncio.to_thread(render_prompt, state.tokenizer, req.messages, tools, kwargs)
    _check_chars(state, prompt, "messages")
    ids = await asyncio.to_thread(encode_prompt, state.tokenizer, prompt)
    cut = await asyncio.to_thread(history_end, state.tokenizer, req.messages, tools, kwargs, prompt, ids)
    system = await asyncio.to_thread(system_end, state.tokenizer, req.messages, tools, kwargs, prompt, ids)
    max_tokens = _max_tokens(state, req.max_completion_tokens or req.max_tokens, len(ids))
    open_reasoning = prompt_opens_reasoning(prompt)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools or []]

    processors = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        processors.append(await asyncio.to_thread(state.grammars.for_json, schema, open_reasoning))
    elif mode in ("required", "named"):
        processors.append(await asyncio.to_thread(state.grammars.for_tools, tool_dicts, named,
                                                  req.parallel_tool_calls, open_reasoning))
    elif mode == "auto":
        lazy = await asyncio.to_thread(state.grammars.for_auto_tools, tool_dicts, req.parallel_tool_calls)
        processors += [lazy] if lazy is not None else []
    processors += _logit_bias(state, req.logit_bias)

    parse_tools = mode != "none" and not (fmt is not None and fmt.type != "text")
    reasoning = state.settings.reasoning_parser is not None

    stops = list(req.stop or [])
    max_calls = None if req.parallel_tool_calls or not parse_tools else 1

    def make_parser() -> ChatOutputParser:
        return ChatOutputParser(reasoning=reasoning, starts_in_reasoning=open_reasoning,
                                tools=tool_dicts, parse_tools=parse_tools, stops=stops, max_calls=max_calls)

    params = sampling_params(req, max_tokens, req.logprobs, req.top_logprobs or 0, processors)
    params.stop = []  # the parser matches them in the answer alone (see Generation.pieces)
    return Job("chat", ids, params, req.model or state.settings.model_name, req.stream,
               bool(req.stream_options and req.stream_options.include_usage), make_parser,
               id=new_id("chatcmpl"), snapshot_at=tuple(p for p in (system, cut) if p),
               shared_at=(system,) if system else ())


async def completion_job(state: ServerState, req: CompletionRequest) -> Job:
    state.check_model(req.model)
    _check_n(req.n)
    if req.suffix:
        raise BadRequest("suffix is not supported", param="suffix")
    if isinstance(req.prompt, str):
        _check_chars(state, req.prompt, "prompt")
        ids = await asyncio.to_thread(state.tokenizer.encode, req.prompt)
        ids = list(ids)
    else:
        ids = list(req.prompt)
        bad = [t for t in ids if not 0 <= t < state.grammars.vocab_size]
        if bad:
            raise BadRequest(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
    max_tokens = _max_tokens(state, req.max_tokens if req.max_tokens is not None else 16, len(ids))
    processors = _logit_bias(state, req.logit_bias)
    params = sampling_params(req, max_tokens, req.logprobs is not None, req.logprobs or 0, processors)
    echo = (req.prompt if isinstance(req.prompt, str) else state.tokenizer.decode(ids)) if req.echo else ""
    return Job("completions", ids, params, req.model or state.settings.model_name, req.stream,
               bool(req.stream_options and req.stream_options.include_usage), echo_text=echo,
               id=new_id("cmpl"))


# ---------------------------------------------------------------- running a job

class Generation:
    """A job on the engine. Submitting happens here, so refusals become HTTP errors before any
    streaming starts; leaving `deltas()` early (a disconnect) cancels the request."""

    def __init__(self, state: ServerState, job: Job):
        self.state, self.job = state, job
        self.timer = RequestTimer(state.metrics, job.endpoint)
        try:
            self.stream = state.engine.submit(job.prompt_ids, job.params, snapshot_at=job.snapshot_at,
                                              shared_at=job.shared_at)
        except PromptTooLong as e:
            raise BadRequest(str(e), param="messages", code="context_length_exceeded") from None
        except QueueFull as e:
            raise TooManyRequests(str(e)) from None
        except EngineStopped as e:
            raise Unavailable(str(e)) from None
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def pieces(self, parser: ChatOutputParser, d: Delta) -> list[Piece]:
        """A chat delta through the job's parser; when the parser says the answer is over (a stop
        sequence, or a call past parallel_tool_calls: false), the generation is stopped: the
        next delta is the last, with finish_reason "stop" and the usage."""
        if d.finish_reason in ("error", "cancelled"):
            return []
        done = parser.done
        out = parser.feed(d.text) if d.text else []
        if d.finish_reason is not None:
            out += parser.finish()
        elif parser.done and not done:
            self.state.engine.stop(self.stream.request_id)
        return out

    async def deltas(self) -> AsyncIterator[Delta]:
        finished = False
        try:
            async for d in self.stream:
                self.timer.tokens(len(d.token_ids))
                if d.finish_reason is not None:
                    self.timer.done(d.finish_reason, d.usage)
                    finished = True
                yield d
        finally:
            self.stream.close()
            if not finished:  # the client went away: counted as cancelled
                self.timer.done("cancelled", None)


def _usage(d: Delta) -> UsageInfo:
    u = d.usage
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     total_tokens=u.total_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens))


def _emitted_logprobs(d: Delta) -> list[TokenLogprob]:
    return d.logprobs[: len(d.token_ids)]  # a stop token's logprob comes without its token


def chat_logprobs(state: ServerState, d: Delta) -> list[TokenLogprobOut]:
    out = []
    for lp in _emitted_logprobs(d):
        text = state.token_text(lp.token_id)
        tops = [TopLogprob(token=state.token_text(t), logprob=max(v, MIN_LOGPROB),
                           bytes=list(state.token_text(t).encode())) for t, v in lp.top]
        out.append(TokenLogprobOut(token=text, logprob=max(lp.logprob, MIN_LOGPROB), bytes=list(text.encode()),
                                   top_logprobs=tops))
    return out


def completion_logprobs(state: ServerState, d: Delta, acc: CompletionLogprobs, offset: int) -> int:
    for lp in _emitted_logprobs(d):
        text = state.token_text(lp.token_id)
        acc.tokens.append(text)
        acc.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
        acc.top_logprobs.append({state.token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top})
        acc.text_offset.append(offset)
        offset += len(text)
    return offset


def finish_reason(d: Delta, num_calls: int, answer_done: bool = False) -> str:
    """answer_done: the parser ended the answer (the engine may have reached the length first)."""
    if d.finish_reason in ("error", "cancelled"):
        raise APIError(f"generation ended early ({d.finish_reason})")
    if (d.finish_reason == "stop" or answer_done) and num_calls:
        return "tool_calls"
    return "stop" if answer_done else d.finish_reason
