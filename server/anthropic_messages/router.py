"""POST /v1/messages and /v1/messages/count_tokens. A request is translated into a
ChatCompletionRequest and run by serving.chat_job + Generation, exactly as chat completions are;
only the fold differs.

Every error on these routes, the app's authentication and readiness checks included, leaves in
Anthropic's shape ({"type": "error", "error": {"type", "message"}}): the routes' own route class
catches them, so the app's OpenAI-shaped handlers never see them."""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from server.errors import APIError, BadRequest
from server.openapi import json_body
from server.protocol import load_json
from server.serving import Generation, ServerState, chat_job

from .fold import MessageFold, new_message_id
from .protocol import CountTokensRequest, MessagesRequest, error_body
from .translate import chat_request

log = logging.getLogger("deltaserve.server")

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _path(loc: tuple) -> str:
    """Anthropic's dotted form (messages.0.content.1.text), without pydantic's union tags."""
    parts = [str(p) for p in loc
             if isinstance(p, int) or not (p in _TYPE_TAGS or "[" in p or p[:1].isupper() or p.startswith("function-"))]
    return ".".join(parts) or "body"


async def _parse(request: Request, model: type[BaseModel]):
    try:
        data = load_json(await request.body())
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = list(dict.fromkeys(f"{_path(err['loc'])}: {err['msg']}" for err in e.errors()))
        raise BadRequest("; ".join(lines[:3])) from None


def _sse(event: tuple[str, dict]) -> dict:
    name, data = event
    return {"event": name, "data": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


def messages_routes(state: ServerState, until_disconnect: Callable) -> APIRouter:
    """until_disconnect: the app's runner for non-streamed generations (cancels on disconnect)."""

    def reply(status: int, message: str) -> JSONResponse:
        state.metrics.errors.labels(str(status)).inc()
        return JSONResponse(error_body(status, message), status_code=status,
                            headers={"Retry-After": "1"} if status == 503 else None)

    class AnthropicRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except APIError as e:
                    return reply(e.status, e.message)
                except Exception as e:
                    log.exception("unhandled error on %s", request.url.path)
                    return reply(500, f"internal error: {type(e).__name__}")

            return route

    router = APIRouter(route_class=AnthropicRoute)

    @router.post("/messages", openapi_extra=json_body(MessagesRequest))
    async def messages(request: Request):
        body = await _parse(request, MessagesRequest)
        job = await chat_job(state, chat_request(body))
        gen = Generation(state, job)
        fold = MessageFold(gen, new_message_id(), body.model, body.stop_sequences or [])

        if body.stream:
            async def events() -> AsyncIterator[dict]:
                for e in fold.start():
                    yield _sse(e)
                try:
                    async for d in gen.deltas():
                        for e in fold.add(d):
                            yield _sse(e)
                except APIError as e:
                    yield _sse(("error", error_body(e.status, e.message)))

            return EventSourceResponse(events(), ping=15, ping_message_factory=lambda: ServerSentEvent(
                event="ping", data='{"type":"ping"}'))

        async def whole() -> dict:
            async for d in gen.deltas():
                fold.add(d)
            return fold.message

        result = await until_disconnect(request, whole())
        return Response(status_code=204) if result is None else result

    @router.post("/messages/count_tokens", openapi_extra=json_body(CountTokensRequest))
    async def count_tokens(request: Request):
        job = await chat_job(state, chat_request(await _parse(request, CountTokensRequest)))
        return {"input_tokens": len(job.prompt_ids)}

    return router
