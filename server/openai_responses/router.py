"""The /v1/responses routes. A request is translated into a ChatCompletionRequest and run by
serving.chat_job + Generation, exactly as chat completions are; only the fold differs."""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse

from server.errors import APIError, NotFound
from server.openapi import json_body
from server.serving import Generation, ServerState, chat_job

from .fold import ResponseFold, base_response
from .protocol import ResponsesRequest
from .store import ResponseStore, Stored
from .translate import chat_request, input_items


def _not_found(response_id: str, param: str = "response_id") -> NotFound:
    return NotFound(f"no response with id {response_id!r} is stored here (responses are kept in memory, "
                    "up to the server's --responses-store-size, and only with store: true)",
                    param=param, code="not_found")


def responses_routes(state: ServerState, parse_body: Callable, until_disconnect: Callable) -> APIRouter:
    """The app's own pieces, shared by every route: parse_body (JSON -> a request model, errors as
    400s naming the field) and until_disconnect (runs a non-streamed generation, cancelled when the
    client goes away)."""
    router = APIRouter()
    store = ResponseStore(state.settings.responses_store_bytes)

    @router.post("/responses", openapi_extra=json_body(ResponsesRequest))
    async def create(request: Request):
        body = await parse_body(request, ResponsesRequest)
        items = input_items(body)
        if body.previous_response_id is not None:
            previous = store.get(body.previous_response_id)
            if previous is None:
                raise _not_found(body.previous_response_id, "previous_response_id")
            items = previous.conversation() + items
        job = await chat_job(state, chat_request(body, items))
        keep = body.store is not False
        gen = Generation(state, job)
        parser = job.make_parser()
        fold = ResponseFold(base_response(body, job, keep), parser, lambda d: gen.pieces(parser, d))

        def save() -> None:
            if keep and fold.response["status"] != "failed":
                store.put(Stored(fold.response, items))

        if body.stream:
            async def events() -> AsyncIterator[dict]:
                for e in fold.start():
                    yield _sse(e)
                async for d in gen.deltas():
                    for e in fold.add(d):
                        if e["type"] in ("response.completed", "response.incomplete"):
                            save()
                        yield _sse(e)

            return EventSourceResponse(events(), ping=15)

        async def whole() -> dict:
            async for d in gen.deltas():
                fold.add(d)
            if fold.response["status"] == "failed":
                raise APIError(fold.response["error"]["message"])
            save()
            return fold.response

        result = await until_disconnect(request, whole())
        return Response(status_code=204) if result is None else result

    @router.get("/responses/{response_id}")
    async def retrieve(response_id: str):
        stored = store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored.response

    @router.delete("/responses/{response_id}")
    async def delete(response_id: str):
        if not store.delete(response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    return router


def _sse(event: dict) -> dict:
    return {"event": event["type"], "data": json.dumps(event, ensure_ascii=False, separators=(",", ":"))}
