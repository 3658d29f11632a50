"""Responses folded from a Generation's deltas: chat and completions, whole or as SSE chunks."""

from __future__ import annotations

from typing import AsyncIterator, Optional

from .errors import APIError
from .output import AnswerLogprobs, ChatMessageParts, Piece
from .protocol import (
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatMessageOut, ChoiceLogprobs, ChunkChoice, ChunkDelta,
    Completion, CompletionChoice, CompletionLogprobs, FunctionDelta, FunctionOut, ToolCallDeltaOut, ToolCallOut,
    dump_chunk,
)
from .serving import Generation, ServerState, _usage, chat_logprobs, completion_logprobs, finish_reason


def error_event(e: APIError) -> str:
    import json

    return json.dumps(e.body(), ensure_ascii=False)


# ---------------------------------------------------------------- chat

async def chat_whole(state: ServerState, gen: Generation) -> ChatCompletion:
    job = gen.job
    parser, parts, logprobs, last = job.make_parser(), ChatMessageParts(), [], None
    answer_logprobs = AnswerLogprobs()
    async for d in gen.deltas():
        pieces = gen.pieces(parser, d)
        parts.add(pieces)
        if job.params.logprobs:
            logprobs += answer_logprobs.step(parser, chat_logprobs(state, d), pieces)
        last = d
    calls = [ToolCallOut(id=c.id, function=FunctionOut(name=c.name, arguments=c.arguments))
             for c in parts.tool_calls.values()]
    content: Optional[str] = parts.content
    if calls and not content:
        content = None
    reasoning = parts.reasoning or None
    message = ChatMessageOut(content=content, reasoning_content=reasoning, reasoning=reasoning, tool_calls=calls or None)
    choice = ChatChoice(message=message, finish_reason=finish_reason(last, len(calls), parser.done),
                        logprobs=ChoiceLogprobs(content=logprobs) if job.params.logprobs else None)
    return ChatCompletion(id=job.id, created=job.created, model=job.model, choices=[choice], usage=_usage(last))


def _chunk_delta(p: Piece) -> ChunkDelta:
    if p.channel == "reasoning":
        return ChunkDelta(reasoning_content=p.text, reasoning=p.text)
    if p.channel == "content":
        return ChunkDelta(content=p.text)
    c = p.call
    call = ToolCallDeltaOut(index=c.index, id=c.id, type="function" if c.id else None,
                            function=FunctionDelta(name=c.name, arguments=c.arguments))
    return ChunkDelta(tool_calls=[call])


async def chat_stream(state: ServerState, gen: Generation) -> AsyncIterator[str]:
    job = gen.job

    def chunk(delta: ChunkDelta, finish: Optional[str] = None, logprobs=None) -> str:
        c = ChatCompletionChunk(id=job.id, created=job.created, model=job.model,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)])
        return dump_chunk(c, usage_null=job.include_usage)

    yield chunk(ChunkDelta(role="assistant", content=""))
    parser, answer_logprobs = job.make_parser(), AnswerLogprobs()
    try:
        async for d in gen.deltas():
            pieces = gen.pieces(parser, d)
            lp = None
            if job.params.logprobs:
                tokens = answer_logprobs.step(parser, chat_logprobs(state, d), pieces)
                lp = ChoiceLogprobs(content=tokens) if tokens else None
            for p in pieces:
                # a step's answer tokens ride on its content chunk
                yield chunk(_chunk_delta(p), logprobs=lp if p.channel == "content" else None)
                lp = None if p.channel == "content" else lp
            if d.finish_reason is not None:
                yield chunk(ChunkDelta(), finish=finish_reason(d, parser.num_calls, parser.done))
                if job.include_usage:
                    yield dump_chunk(ChatCompletionChunk(id=job.id, created=job.created, model=job.model,
                                                         choices=[], usage=_usage(d)))
    except APIError as e:
        yield error_event(e)
    yield "[DONE]"


# ---------------------------------------------------------------- completions

async def completion_whole(state: ServerState, gen: Generation) -> Completion:
    job = gen.job
    text, last = job.echo_text, None
    logprobs = CompletionLogprobs() if job.params.logprobs else None
    offset = len(text)
    async for d in gen.deltas():
        if logprobs is not None:
            offset = completion_logprobs(state, d, logprobs, offset)
        text += d.text
        last = d
    choice = CompletionChoice(text=text, finish_reason=finish_reason(last, 0), logprobs=logprobs)
    return Completion(id=job.id, created=job.created, model=job.model, choices=[choice], usage=_usage(last))


async def completion_stream(state: ServerState, gen: Generation) -> AsyncIterator[str]:
    job = gen.job

    def chunk(text: str, finish: Optional[str] = None, logprobs=None) -> str:
        c = Completion(id=job.id, created=job.created, model=job.model,
                       choices=[CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)])
        return dump_chunk(c, usage_null=job.include_usage)

    offset = 0
    if job.echo_text:
        yield chunk(job.echo_text)
        offset = len(job.echo_text)
    try:
        async for d in gen.deltas():
            lp = None
            if job.params.logprobs:
                lp = CompletionLogprobs()
                offset = completion_logprobs(state, d, lp, offset)
            if d.text or lp is not None and lp.tokens:
                yield chunk(d.text, logprobs=lp)
            if d.finish_reason is not None:
                yield chunk("", finish=finish_reason(d, 0))
                if job.include_usage:
                    yield dump_chunk(Completion(id=job.id, created=job.created, model=job.model, choices=[],
                                                usage=_usage(d)))
    except APIError as e:
        yield error_event(e)
    yield "[DONE]"
