"""The /openapi.json document. The routes parse their bodies themselves (load_json's limits, errors in
each API family's own shape), so FastAPI sees no body parameter: each POST route names its request
model with `json_body`, and `document` puts the models' JSON schemas under components and gives
every operation the error responses it can answer, in its family's shape."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .anthropic_messages.protocol import ERROR_TYPES
from .protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"enum": sorted({*ERROR_TYPES.values(), "api_error"})},
                                 "message": {"type": "string"}}},
    },
}

# status -> when; 413 and 415 only where a body is read
_ERRORS = {400: "the request is invalid (the message names the field)", 401: "no valid API key",
           403: "the Host header is not a loopback name on a loopback-bound server",
           404: "no such model or stored response", 413: "the body is over --max-body-size",
           415: "the body is not JSON (Content-Type)", 429: "the queue is full",
           500: "an error of the server itself", 503: "warming up, shutting down, or too many connections"}


def json_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that parses `model` from a JSON body itself; a model with a `stream`
    field answers `stream: true` with server-sent events."""
    extra = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}
    if "stream" in model.model_fields:
        extra["responses"] = {"200": {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}
    return extra


def _errors(path: str, method: str) -> dict:
    schema = ({"$ref": "#/components/schemas/AnthropicError"} if path.startswith("/v1/messages")
              else {"$ref": _REF.format(model=ErrorResponse.__name__)})
    codes = [c for c in _ERRORS if method == "post" or c not in (413, 415)]
    return {str(c): {"description": _ERRORS[c], "content": {"application/json": {"schema": schema}}} for c in codes}


def document(app: FastAPI, request_models: list[type[BaseModel]]) -> dict:
    """The app's OpenAPI document, made once; request_models: those the routes name in json_body."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in (*request_models, ErrorResponse)], ref_template=_REF)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(defs["$defs"])
        schemas["AnthropicError"] = ANTHROPIC_ERROR
        for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422: we answer 400 instead
            schemas.pop(name, None)
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                op["responses"].pop("422", None)
                if path.startswith("/v1/"):
                    op["responses"].update(_errors(path, method))
        app.openapi_schema = doc
    return app.openapi_schema
