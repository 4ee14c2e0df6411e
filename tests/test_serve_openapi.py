"""GET /openapi.json is a valid OpenAPI 3.1 document of every route of the app with each pipeline's
request schema (the one the server validates with), and GET /docs shows it as a static page."""
from __future__ import annotations

import base64

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from runtime.requests import request_fields
from runtime.serve.schemas import SERVE_FIELDS
from serve_helpers import serve_in_thread, wait_ready
from test_serve_app import make_app, photo_bytes

SERVED = ("instantid", "ip-adapter")  # what make_app's server runs


@pytest.fixture(scope="module")
def served():
    app, _ = make_app()
    with serve_in_thread(app) as url:
        wait_ready(url, 30)
        yield app, url, httpx.get(url + "/openapi.json").json()


def test_the_document_validates_and_lists_every_route(served):
    app, _, document = served
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema or an unresolved $ref
    assert document["openapi"] == "3.1.0"
    routes = set()
    for route in app.routes:
        routes |= {f"/v1/{name}" for name in SERVED} if route.path == "/v1/{pipeline}" else {route.path}
    assert set(document["paths"]) == routes == {"/healthz", "/readyz", "/metrics", "/v1/schema", "/openapi.json",
                                                "/docs", "/v1/instantid", "/v1/ip-adapter"}


@pytest.mark.parametrize("name", SERVED)
def test_each_endpoint_has_its_request_schema(served, name):
    _, _, document = served
    schemas = document["components"]["schemas"]
    content = document["paths"][f"/v1/{name}"]["post"]["requestBody"]["content"]
    body = schemas[content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    form = schemas[content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    fields = [spec.name for spec in request_fields(_request_type(name))]
    assert list(body["properties"]) == fields + list(SERVE_FIELDS) and body["required"] == ["prompt"]
    assert body["properties"]["steps"].items() >= {"minimum": 1, "maximum": 150, "default": 30}.items()
    assert body["properties"]["ip_scale"]["default"] == (0.8 if name == "instantid" else 0.6)
    assert form["properties"]["image"]["format"] == "binary" and body["properties"]["image"]["anyOf"][0] == {
        "type": "string"}
    answers = document["paths"][f"/v1/{name}"]["post"]["responses"]
    assert {"200", "400", "404", "413", "422", "429", "503", "504"} <= set(answers)
    assert answers["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def _request_type(name: str):
    from runtime.pipelines import PIPELINES

    return PIPELINES[name].request_type


def test_the_server_answers_as_the_document_says(served):
    """A body the document's schema refuses is refused by the server (422); one it accepts is served."""
    _, url, document = served
    schema = {"$ref": "#/components/schemas/InstantIDRequest", "components": document["components"]}
    image = base64.b64encode(photo_bytes()).decode()
    good = {"prompt": "a portrait", "image": image, "steps": 2, "width": 128, "height": 128, "ip_scale": [0.5, 0.7]}
    jsonschema.validate(good, schema, cls=jsonschema.Draft202012Validator)
    assert httpx.post(url + "/v1/instantid", json=good).status_code == 200
    for change, message in ((dict(steps=0), "steps: Input should be greater than or equal to 1"),
                            (dict(width=100), "width: must be a multiple of 64 (e.g. 128)"),
                            (dict(scheduler="heun"), "scheduler: Input should be 'euler', 'euler_a'"),
                            (dict(x=1), "x: unknown field"),
                            (dict(ip_scale=[0.5, 5.0]), "ip_scale: Input should be less than or equal to 4"),
                            (dict(ip_scale=[]), "ip_scale: List should have at least 1 item")):
        bad = {**good, **change}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)
        answer = httpx.post(url + "/v1/instantid", json=bad)
        assert answer.status_code == 422 and answer.json()["error"]["kind"] == "invalid_request", bad
        assert answer.json()["error"]["message"].startswith(message), answer.json()


def test_docs_page_shows_every_route_and_field_offline(served):
    _, url, document = served
    page = httpx.get(url + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text
    for path in document["paths"]:
        assert f"{path}</code>" in page.text, path
    for spec in request_fields(_request_type("instantid")):
        assert f"<code>{spec.name}</code>" in page.text, spec.name


def test_docs_serving_md_shows_the_current_request_fields():
    """docs/serving.md's table is `python -m runtime.serve.openapi --fields` (regenerate it after a change)."""
    from pathlib import Path

    from runtime.pipelines import PIPELINES
    from runtime.serve.openapi import fields_markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    begin = "<!-- request fields: generated by python -m runtime.serve.openapi --fields -->\n"
    shown = text[text.index(begin) + len(begin):text.index("<!-- end of request fields -->")]
    assert shown == fields_markdown(list(PIPELINES))
    assert "| `controlnet_scale` | instantid | number >= 0.0, <= 4.0 | 0.8 |" in shown
