"""Limits and browser safety at the front door: body size (413 before reading it), prompt
characters (before tokenizing), header timeout, connection count, Host on a loopback-bound
server (DNS rebinding), JSON-only POST bodies (415), CORS only for allowed origins."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from server_harness import ServerThread, tiny_app

from server.http_server import uvicorn_config

HI = [{"role": "user", "content": "Hi"}]


def served(engine, **settings) -> ServerThread:
    """The app on a socket under the same uvicorn configuration as `deltaserve serve`."""
    app = tiny_app(engine, log_level="warning", **settings)
    srv = ServerThread(app)
    srv.server = uvicorn.Server(uvicorn_config(app, app.state.server.settings))
    srv.thread = threading.Thread(target=srv.server.run, kwargs={"sockets": [srv.sock]}, daemon=True)
    return srv


@pytest.fixture(scope="module")
def server(engine):
    with served(engine, max_body_bytes=4096, max_prompt_chars=3000, header_timeout_s=0.5,
                allowed_origins=["http://localhost:3000"]) as srv:
        yield srv


def raw(srv, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.sendall(data)
    return s


def read_all(s: socket.socket) -> bytes:
    """Until the server closes the connection (socket.timeout if it does not)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def response_of(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(srv, path, body, **headers):
    return httpx.post(srv.base_url + path, content=json.dumps(body),
                      headers={"content-type": "application/json", **headers}, timeout=30)


# ---------------------------------------------------------------- body size

def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    s = raw(server, head + b'{"messages": [' + b" " * 1000)  # 50 MB announced, 1 KB sent
    status, body = response_of(read_all(s))
    assert status == 413
    assert body["error"]["code"] == "request_too_large" and "4096" in body["error"]["message"]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    s = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):  # 5 KB against a 4 KB limit, and no last chunk: only counting can end it
        s.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
    status, body = response_of(read_all(s))
    assert status == 413 and body["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_over_the_limit_on_messages_is_refused_in_anthropic_shape(server):
    s = raw(server, b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        s.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
    status, body = response_of(read_all(s))
    assert status == 413 and body["type"] == "error" and body["error"]["type"] == "request_too_large"


def test_a_body_within_the_limit_is_served(server):
    r = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- prompt characters

@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 2000}]}),
    ("/v1/completions", {"prompt": "x " * 2000}),
    ("/v1/messages", {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x " * 2000}]}),
])
def test_a_prompt_over_the_character_limit_is_refused_naming_it(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert "--max-prompt-chars" in r.text and "3000" in r.text


# ---------------------------------------------------------------- connections

def test_half_a_request_line_is_closed_after_the_header_timeout(server):
    s = raw(server, b"POST /v1/chat/comp")
    started = time.monotonic()
    assert read_all(s) == b""  # closed, without an answer
    assert time.monotonic() - started < 3


def test_half_a_second_request_is_closed_after_the_header_timeout(server):
    s = raw(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += s.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /hea")  # keep-alive, then the start of a request that never ends
    assert read_all(s) == b""


def test_a_slow_stream_is_not_cut_by_the_header_timeout(server):
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=30,
                      json={"prompt": "Once", "max_tokens": 40, "ignore_eos": True, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_past_max_connections_requests_get_503(engine):
    with served(engine, max_connections=3) as srv:
        assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
        idle = [raw(srv, b"") for _ in range(3)]
        try:
            assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 503
        finally:
            for s in idle:
                s.close()


# ---------------------------------------------------------------- browser safety

@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.1.2.3:80", "[::1]:8000"])
def test_loopback_host_names_are_answered(server, host):
    assert httpx.get(server.base_url + "/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1"])
def test_a_foreign_host_is_refused_on_a_loopback_bound_server(server, host):
    r = httpx.get(server.base_url + "/v1/models", headers={"Host": host})
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host"
    assert 'deltaserve_request_errors_total{status="403"}' in httpx.get(server.base_url + "/metrics").text


def test_a_foreign_host_is_answered_when_bound_elsewhere_or_allowed(engine):
    with served(engine, host="0.0.0.0") as srv:
        assert httpx.get(srv.base_url + "/v1/models", headers={"Host": "box.lan"}).status_code == 200
    with served(engine, allowed_hosts=["proxy.internal"]) as srv:
        assert httpx.get(srv.base_url + "/v1/models", headers={"Host": "proxy.internal:80"}).status_code == 200
        assert httpx.get(srv.base_url + "/v1/models", headers={"Host": "evil.example"}).status_code == 403


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_post_body_that_is_not_json_gets_415(server, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(server.base_url + "/v1/chat/completions", content=json.dumps({"messages": HI}), headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_curl_d_without_a_json_content_type_is_refused_on_messages_in_anthropic_shape(server):
    r = httpx.post(server.base_url + "/v1/messages", data={"model": "tiny"})  # what curl -d sends
    assert r.status_code == 415 and r.json()["type"] == "error"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_are_accepted(server, content_type):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=json.dumps({"messages": HI, "max_tokens": 2}),
                   headers={"content-type": content_type}, timeout=30)
    assert r.status_code == 200, r.text


def preflight(srv, origin):
    return httpx.options(srv.base_url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})


def test_cors_preflight_is_answered_only_for_an_allowed_origin(server, engine):
    ok = preflight(server, "http://localhost:3000")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in preflight(server, "http://evil.example").headers
    with served(engine) as default:  # no --allowed-origins: no origin at all
        assert "access-control-allow-origin" not in preflight(default, "http://localhost:3000").headers
