"""/openapi.json describes the API: it validates as OpenAPI 3 (openapi-spec-validator), every POST
route documents its JSON body, with a schema that accepts what the server serves and refuses what
it refuses, error responses carry each family's error schema (checked against real error answers),
and /metrics is Prometheus' text."""

import json

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

HI = [{"role": "user", "content": "Hi"}]
# per POST route: a body the server answers 200, and one it refuses with a 400
BODIES = {
    "/v1/chat/completions": ({"model": "tiny", "messages": HI, "max_tokens": 2}, {"model": "tiny"}),
    "/v1/completions": ({"model": "tiny", "prompt": "Hi", "max_tokens": 2}, {"model": "tiny", "prompt": 5}),
    "/v1/responses": ({"model": "tiny", "input": "Hi", "max_output_tokens": 2}, {"model": "tiny", "input": 5}),
    "/v1/messages": ({"model": "tiny", "messages": HI, "max_tokens": 2}, {"model": "tiny", "messages": HI}),
    "/v1/messages/count_tokens": ({"model": "tiny", "messages": HI}, {"model": "tiny", "messages": []}),
}


@pytest.fixture(scope="module")
def doc(server):
    resp = httpx.get(server.base_url + "/openapi.json", timeout=30)
    assert resp.status_code == 200
    return resp.json()


def schema_of(doc, node: dict) -> Draft202012Validator:
    """A validator for one schema of the document, its $refs resolved within the document."""
    return Draft202012Validator({**node, "components": doc["components"]})


def post(server, path, body):
    return httpx.post(server.base_url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


def test_document_is_valid_openapi_3(doc):
    assert doc["openapi"].startswith("3.")
    validate(doc)


def test_every_post_route_documents_its_body(doc):
    posts = {path for path, ops in doc["paths"].items() if "post" in ops}  # FastAPI lists every route
    assert posts == set(BODIES)
    for path in posts:
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True and set(body["content"]) == {"application/json"}
        assert body["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/")
        answers = set(doc["paths"][path]["post"]["responses"]["200"]["content"])
        assert answers == ({"application/json"} if path.endswith("count_tokens") else
                           {"application/json", "text/event-stream"}), path  # stream: true


@pytest.mark.parametrize("path", list(BODIES))
def test_body_schema_agrees_with_the_server(server, doc, path):
    good, bad = BODIES[path]
    schema = schema_of(doc, doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert post(server, path, good).status_code == 200
    schema.validate(good)
    resp = post(server, path, bad)
    assert resp.status_code == 400
    assert not schema.is_valid(bad)
    # the refusal is the documented error body of the route's family
    error = doc["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    schema_of(doc, error).validate(resp.json())


def test_error_shapes_per_family(server, doc):
    """OpenAI's envelope everywhere but /v1/messages, which answers in Anthropic's; the schemas tell them apart."""
    openai_error = schema_of(doc, doc["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]
                             ["application/json"]["schema"])
    anthropic_error = schema_of(doc, doc["paths"]["/v1/messages"]["post"]["responses"]["400"]["content"]
                                ["application/json"]["schema"])
    missing = httpx.get(server.base_url + "/v1/responses/resp_nothing", timeout=30)
    assert missing.status_code == 404
    documented = doc["paths"]["/v1/responses/{response_id}"]["get"]["responses"]["404"]
    schema_of(doc, documented["content"]["application/json"]["schema"]).validate(missing.json())
    assert openai_error.is_valid(missing.json()) and not anthropic_error.is_valid(missing.json())
    refused = post(server, "/v1/messages", {"model": "tiny"}).json()
    assert anthropic_error.is_valid(refused) and not openai_error.is_valid(refused)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)  # FastAPI's default; we answer 400
            if path.startswith("/v1/"):
                assert {"400", "401", "404", "500", "503"} <= set(op["responses"]), (method, path)


def test_metrics_is_text(server, doc):
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    resp = httpx.get(server.base_url + "/metrics", timeout=30)
    assert resp.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in resp.text
