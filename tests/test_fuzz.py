"""No 500 for bad input: schemathesis generates requests from our own /openapi.json, bodies that fit
the schema and bodies that break it, and sends them to the tiny model on a real socket; every
answer is below 500. Derandomized and bounded (a fixed number of examples per route and mode) so
that it runs the same way, in about half a minute, every time."""

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from server_harness import ServerThread, tiny_app, tiny_engine

BOTH = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# (method, path, examples per mode, modes): a GET's string path parameter cannot be made invalid
OPERATIONS = [("POST", "/v1/chat/completions", 36, BOTH), ("POST", "/v1/completions", 16, BOTH),
              ("POST", "/v1/responses", 20, BOTH), ("POST", "/v1/messages", 20, BOTH),
              ("POST", "/v1/messages/count_tokens", 10, BOTH), ("GET", "/v1/models", 2, BOTH[:1]),
              ("GET", "/v1/models/{name}", 5, BOTH[:1]), ("GET", "/v1/responses/{response_id}", 5, BOTH[:1]),
              ("DELETE", "/v1/responses/{response_id}", 5, BOTH[:1]), ("GET", "/health", 2, BOTH[:1])]
CASES = [(method, path, examples, mode) for method, path, examples, modes in OPERATIONS for mode in modes]
HI = {"role": "user", "content": "Hi"}


def reaching_generation(path: str, body: dict) -> None:
    """A body that fits the schema, given what the schema cannot say (a user or system message needs
    content, only our model name is served, one choice per request, a context of 96 tokens, ...), so that most of them reach
    the template, the grammars and the engine rather than stopping at a 400."""
    body["model"] = "tiny"  # any other name is a 404 before the rest of the body matters
    if "n" in body:
        body["n"] = 1
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):  # within the short context
        if body.get(key) is not None:
            body[key] = min(body[key], 8)
    if path == "/v1/chat/completions":
        for m in body["messages"]:
            if m["role"] != "assistant":
                m.setdefault("content", "Hi")
                m.pop("tool_calls", None)
        body["messages"].append(HI)
        if body.get("top_logprobs"):
            body["logprobs"] = True
    elif path == "/v1/completions":
        if isinstance(body["prompt"], list) and body["prompt"] and isinstance(body["prompt"][0], (str, list)):
            body["prompt"] = body["prompt"][0]
        body["prompt"] = body["prompt"] or "Hi"
        body.pop("suffix", None)
    elif path == "/v1/responses":
        body["input"] = body.get("input") or "Hi"
        body.pop("background", None)
        body.pop("conversation", None)
    elif path.startswith("/v1/messages"):
        body["messages"].append(HI)


@pytest.fixture(scope="module")
def engine():
    e = tiny_engine(max_model_len=96)  # a short context keeps every generated request short
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(tiny_app(engine, max_tokens=4)) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json")


@pytest.mark.parametrize("method,path,examples,mode", CASES)
def test_no_server_error(server, schema, method, path, examples, mode):
    session = requests.Session()  # kept alive: a 500 closes the connection, so later requests would see it too
    statuses, failures = [], []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    def run(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            reaching_generation(path, case.body)
        resp = case.call(base_url=server.base_url, session=session, timeout=60)
        statuses.append(resp.status_code)
        if resp.status_code >= 500:
            failures.append(f"{resp.status_code} {resp.text[:300]}\n{case.as_curl_command()}")

    run()
    assert not failures, "\n\n".join(failures[:5])
    if mode is GenerationMode.POSITIVE and method == "POST":  # the fuzzing reached past validation
        assert statuses.count(200) >= len(statuses) // 4, statuses
