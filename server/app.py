"""The HTTP layer: `create_app(settings, engine)` builds a FastAPI app with the OpenAI routes.
No module state: everything hangs off the ServerState made here. Errors of every kind leave as
OpenAI's error JSON from the handlers at the bottom.

While the server warms up (server/warmup.py), /health answers 503 {"status": "starting"} and the
/v1 routes answer 503 (type service_unavailable, code server_starting) with Retry-After: 1, rather
than holding requests until ready: orchestrators route no traffic before /health says ok, and
clients that come early learn why at once (OpenAI's clients retry a 503 by themselves) instead of
waiting on an open connection for a warm-up that can outlast their timeouts."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .anthropic_messages.router import messages_routes
from .anthropic_messages.protocol import CountTokensRequest, MessagesRequest
from .constrained import GrammarCompiler
from .errors import APIError, BadRequest, NotFound, Unauthorized, Unavailable
from .guards import Guards, is_loopback
from .metrics import Metrics
from .openai_responses.router import responses_routes
from .openai_responses.protocol import ResponsesRequest
from .openapi import document, json_body
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, load_json, now
from .responses import chat_stream, chat_whole, completion_stream, completion_whole
from .serving import Generation, ServerState, chat_job, completion_job
from .settings import Settings
from .warmup import WarmUp

log = logging.getLogger("deltaserve.server")

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "NoneType"}


def _field_path(loc: tuple) -> str:
    """messages[0].role from pydantic's ('messages', 0, 'role'), without union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or part[:1].isupper() or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def validation_error(e: ValidationError) -> BadRequest:
    seen, lines = set(), []
    for err in e.errors():
        path = _field_path(err["loc"]) or "body"
        if path in seen:
            continue
        seen.add(path)
        lines.append(f"{path}: {err['msg']}")
    first = _field_path(e.errors()[0]["loc"]) if e.errors() else None
    return BadRequest("; ".join(lines[:3]), param=first or None)


async def parse_body(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = load_json(raw)
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


async def until_disconnect(request: Request, coro, poll_s: float = 0.2):
    """Run a non-streaming generation; a client that goes away cancels it (and its sequence)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


def _api_key_check(api_key: Optional[str]):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        x_api_key = request.headers.get("x-api-key", "").strip()  # Anthropic's clients send this
        if not any(hmac.compare_digest(key.encode(), expected) for key in (bearer, x_api_key) if key):
            raise Unauthorized("a valid API key is needed: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                               code="invalid_api_key")

    return check


def _starting(warm_up: Optional[WarmUp]) -> bool:
    return warm_up is not None and not warm_up.ready.is_set()


def _ready_check(warm_up: Optional[WarmUp]):
    async def check() -> None:
        if _starting(warm_up):
            raise Unavailable("the server is starting (warming up the model); retry in a moment",
                              code="server_starting")

    return check


def _v1_routes(state: ServerState, warm_up: Optional[WarmUp]) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(state.settings.api_key)),
                                                   Depends(_ready_check(warm_up))])

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=state.started, max_model_len=state.max_model_len)

    @router.get("/models")
    async def models():
        return ModelList(data=[card(n) for n in state.settings.served_model_names]).model_dump()

    @router.get("/models/{name:path}")
    async def model(name: str):
        state.check_model(name)  # 404 model_not_found, as for a request naming it
        return card(name).model_dump()

    @router.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat(request: Request):
        job = await chat_job(state, await parse_body(request, ChatCompletionRequest))
        gen = Generation(state, job)
        if job.stream:
            return EventSourceResponse(chat_stream(state, gen), ping=15)
        result = await until_disconnect(request, chat_whole(state, gen))
        return Response(status_code=204) if result is None else result.model_dump()

    @router.post("/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        job = await completion_job(state, await parse_body(request, CompletionRequest))
        gen = Generation(state, job)
        if job.stream:
            return EventSourceResponse(completion_stream(state, gen), ping=15)
        result = await until_disconnect(request, completion_whole(state, gen))
        return Response(status_code=204) if result is None else result.model_dump()

    router.include_router(responses_routes(state, parse_body, until_disconnect))
    router.include_router(messages_routes(state, until_disconnect))
    return router


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def reply(status: int, body: dict) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return reply(e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, e: RequestValidationError):
        return reply(400, BadRequest("; ".join(f"{_field_path(x['loc'][1:])}: {x['msg']}" for x in e.errors()[:3]))
                     .body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        err = NotFound(str(e.detail)) if e.status_code == 404 else BadRequest(str(e.detail))
        return reply(e.status_code, err.body())

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return reply(500, APIError(f"internal error: {type(e).__name__}").body())


def create_app(settings: Settings, engine, tokenizer=None, *, max_model_len: Optional[int] = None,
               warm_up: bool = False) -> FastAPI:
    """engine: a started server.engine.Engine (the caller shuts it down). warm_up: start the warm-up
    (app.state.warm_up) on its own thread now and answer 503 until it is over; without it the app
    is ready at once and the first requests pay for what a warm-up would have done."""
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    max_len = max_model_len or engine.max_model_len
    vocab = engine.vocab_size
    metrics = Metrics(engine)
    state = ServerState(settings, engine, tokenizer, metrics, GrammarCompiler(tokenizer, vocab), max_len, now())

    app = FastAPI(title="deltaserve", version="0.1.0")
    app.state.server = state
    app.openapi = lambda: document(app, [ChatCompletionRequest, CompletionRequest, ResponsesRequest, MessagesRequest,
                                         CountTokensRequest])
    app.state.warm_up = WarmUp(state) if warm_up else None

    @app.get("/health", responses={503: {"description": "warming up: {\"status\": \"starting\"}"}})
    async def health():
        if _starting(app.state.warm_up):
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
        if engine.failure:  # a distributed engine that lost a rank (server/distributed.py)
            return JSONResponse({"status": "failed", **Unavailable(engine.failure).body()}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)  # Prometheus' text format
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(_v1_routes(state, app.state.warm_up))
    _install_error_handlers(app, metrics)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    # outermost: a refused request reaches nothing else, a preflight included
    app.add_middleware(Guards, max_body_bytes=settings.max_body_bytes, host_check=is_loopback(settings.host),
                       allowed_hosts=settings.allowed_hosts,
                       refused=lambda status: metrics.errors.labels(str(status)).inc())
    if app.state.warm_up is not None:
        app.state.warm_up.start()
    return app
