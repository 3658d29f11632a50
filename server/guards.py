"""The checks every request passes before a route sees it (an ASGI middleware, so they hold for
every route and read no body they refuse):

- Host: on a loopback-bound server, a Host that is not a loopback name is refused (403). A web page
  can make the browser resolve its own domain to 127.0.0.1 (DNS rebinding) and then read our
  answers as same-origin; the browser still sends the page's domain in Host.
- Content-Type: a POST with a body must say JSON. A page can POST text/plain or a form to any
  address without a CORS preflight, so without this any page the user opens could drive the server.
- Body size: a Content-Length over the limit is answered 413 before any of the body is read; a
  chunked body is counted as it arrives and refused once it passes the limit.

Errors leave in OpenAI's shape, or Anthropic's on /v1/messages."""

from __future__ import annotations

import ipaddress
import json

from .anthropic_messages.protocol import error_body as anthropic_error_body
from .errors import APIError, Forbidden, PayloadTooLarge, UnsupportedMediaType

LOOPBACK_NAMES = {"localhost", "::1"}


def is_loopback(host: str) -> bool:
    """A loopback address or name: 127.0.0.0/8, ::1, localhost (host without port or brackets)."""
    host = host.strip("[]").lower().rstrip(".")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """'[::1]:8000' -> '::1', 'example.com:80' -> 'example.com'."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def is_json_type(content_type: str) -> bool:
    """application/json, or any +json type (application/merge-patch+json), parameters allowed."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class Guards:
    """host_check: refuse non-loopback Host headers (the server is bound to loopback);
    allowed_hosts: more names accepted then ('*' turns the check off); refused(status): counts a refusal."""

    def __init__(self, app, *, max_body_bytes: int, host_check: bool, allowed_hosts: list[str] = (),
                 refused=lambda status: None):
        self.app = app
        self.refused = refused
        self.max_body_bytes = max_body_bytes
        self.host_check = host_check and "*" not in allowed_hosts
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check(scope, headers)
        except APIError as e:
            self.refused(e.status)
            return await _reply(scope, send, e)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            receive, send = self._counting(receive, send)
        await self.app(scope, receive, send)

    def _check(self, scope, headers: dict) -> None:
        if self.host_check:
            name = _host_name(headers.get("host", ""))
            if not is_loopback(name) and name.lower() not in self.allowed_hosts:
                raise Forbidden(f"the Host header {name!r} is not a loopback name; this server is bound to "
                                "loopback and answers only localhost, 127.x.x.x and [::1] (see --allowed-hosts)",
                                code="invalid_host")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return
        length = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (length is not None and length.strip() != "0")
        if has_body and not is_json_type(headers.get("content-type", "")):
            got = headers.get("content-type")
            said = f"got {got!r}" if got else "none was sent"
            raise UnsupportedMediaType(f"the request body must be JSON: send 'Content-Type: application/json' "
                                       f"({said})", code="unsupported_media_type")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than this server's limit of {self.max_body_bytes} "
                               "bytes (--max-body-size)", code="request_too_large")

    def _counting(self, receive, send):
        """Ends a body that grows past the limit (a chunked one: no Content-Length to check up front);
        the route reading it gets the 413 as an APIError and answers it in its own shape, and the
        connection is closed after it rather than reading the rest of the body."""
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    over = True
                    raise self._too_large()
            return message

        async def closing(message):
            if over and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return counted, closing


async def _reply(scope, send, e: APIError) -> None:
    body = anthropic_error_body(e.status, e.message) if scope["path"].startswith("/v1/messages") else e.body()
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
