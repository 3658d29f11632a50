"""Typed errors of the HTTP layer; the app maps each to OpenAI's error JSON in one handler."""

from __future__ import annotations

from typing import Optional


class APIError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"


class Forbidden(APIError):
    status = 403
    type = "permission_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"
