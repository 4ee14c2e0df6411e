"""The service's OpenAPI 3.1 document (GET /openapi.json) and a browsable page of it (GET /docs).

    document = openapi_document(["instantid", "ip-adapter"])     # dict, JSON-ready
    page = docs_page(document)                                   # one HTML page, no scripts, no network
    python -m runtime.serve.openapi [--fields]                   # the document; --fields: the Markdown
                                                                 # table of docs/serving.md's request fields

The request bodies are the pipelines' HTTP models (runtime/serve/schemas.py, derived from the
request types of runtime/requests.py), so the document follows the request types. JSON bodies
carry images as base64 strings; the multipart form of each body (its `...Form` schema) has them
as binary file parts. The page is rendered here from the document, so it works offline.
"""
from __future__ import annotations

import argparse
import html
import importlib.metadata
import json
import sys
from collections.abc import Sequence

from pydantic.json_schema import models_json_schema

from runtime.serve.schemas import FORMATS, REQUEST_MODELS, ErrorResponse, GenerateResponse

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
GENERATE_ERRORS = {
    "400": "the body is not valid JSON, base64 or multipart, or names a field twice",
    "404": "this server does not run that pipeline (GET /readyz lists the served ones)",
    "408": "the body did not arrive within the body timeout",
    "413": "the body or an image is over the size limit",
    "415": "the Content-Type is neither application/json nor multipart/form-data",
    "422": "a field is invalid, the photo has no face, or the size or cost is over the served limits",
    "429": "the queue is full: retry after Retry-After seconds",
    "500": "the generation failed on the server (NaN output, internal error)",
    "503": "not ready yet, or shutting down: retry (Retry-After)",
    "504": "the request did not finish within its timeout",
}


def _version() -> str:
    try:
        return importlib.metadata.version("instantrt")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _ref(model) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _error_responses(statuses: dict[str, str]) -> dict:
    return {status: {"description": text, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
            for status, text in statuses.items()}


def _form_schema(schema: dict, image_fields: Sequence[str]) -> dict:
    """A body's multipart form: the same fields, images as binary file parts."""
    properties = dict(schema["properties"])
    for name in image_fields:
        properties[name] = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
                            "description": properties[name].get("description", "")}
    for name, prop in schema["properties"].items():  # a list of objects (controls) is sent as its JSON text
        if prop.get("type") == "array" and "$ref" in prop.get("items", {}):
            properties[name] = {"type": "string", "contentMediaType": "application/json",
                                "description": prop.get("description", "")}
    return {**schema, "title": f"{schema['title']} (multipart)", "properties": properties}


def _generate_operation(name: str, model) -> dict:
    images = {fmt: {"schema": {"type": "string", "format": "binary"}} for fmt in FORMATS.values()}
    return {"post": {
        "operationId": f"generate_{name.replace('-', '_')}",
        "summary": f"generate with {name}",
        "description": (model.__doc__ or "").strip() + "\n\nSend `Accept: text/event-stream` for Server-Sent Events "
                       "(queued, started, then done with the JSON response, or error).",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref(model)},
            "multipart/form-data": {"schema": {"$ref": REF.format(model=f"{model.__name__}Form")}}}},
        "responses": {
            "200": {"description": "output='image': the encoded image (headers x-seed, x-timings-ms, and "
                                   "x-warnings when a prompt was truncated); output='json': every image "
                                   "base64, and `warnings`",
                    "content": {**images, "application/json": {"schema": _ref(GenerateResponse)},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_error_responses(GENERATE_ERRORS)}}}


def _get(operation_id: str, summary: str, content: dict, errors: dict[str, str] | None = None) -> dict:
    return {"get": {"operationId": operation_id, "summary": summary,
                    "responses": {"200": {"description": summary, "content": content},
                                  **_error_responses(errors or {})}}}


def openapi_document(pipelines: Sequence[str]) -> dict:
    """The OpenAPI 3.1 document of a server running `pipelines` (names of runtime.pipelines.PIPELINES):
    one POST /v1/<pipeline> each with its request schema (JSON and multipart), the JSON answer and
    the error body, plus the health, readiness, metrics, schema and documentation routes."""
    models = list(dict.fromkeys([*(REQUEST_MODELS[name] for name in pipelines), GenerateResponse, ErrorResponse]))
    _, top = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas = dict(top.get("$defs", {}))
    for model in dict.fromkeys(REQUEST_MODELS[name] for name in pipelines):
        schemas[f"{model.__name__}Form"] = _form_schema(schemas[model.__name__], model.image_fields)
    json_object = {"application/json": {"schema": {"type": "object"}}}
    paths = {f"/v1/{name}": _generate_operation(name, REQUEST_MODELS[name]) for name in pipelines}
    paths.update({
        "/healthz": _get("healthz", "the process and its worker thread live", json_object, {"500": "the worker died"}),
        "/readyz": _get("readyz", "ready: warmed up; lists the served pipelines and the queue depth", json_object,
                        {"503": "loading, warming up, failed or shutting down (the message says which)"}),
        "/metrics": _get("metrics", "Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
        "/v1/schema": _get("schema", "the request schemas, served pipelines and limits", json_object),
        "/openapi.json": _get("openapi", "this document", json_object),
        "/docs": _get("docs", "this document as a web page", {"text/html": {"schema": {"type": "string"}}}),
    })
    return {"openapi": OPENAPI_VERSION,
            "info": {"title": "instantrt", "version": _version(),
                     "description": "InstantID and IP-Adapter on SDXL from a TensorRT / ONNX Runtime build "
                                    "(docs/serving.md)."},
            "paths": paths, "components": {"schemas": schemas}}


def docs_page(document: dict) -> str:
    """The document as one HTML page: per route its summary, request fields (name, type, default,
    bounds, description) and responses. Static HTML, no scripts or external assets."""
    schemas = document["components"]["schemas"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(document['info']['title'])} API</title>"
             f"<style>{_STYLE}</style></head><body><h1>{_e(document['info']['title'])} "
             f"{_e(document['info']['version'])}</h1><p>{_e(document['info']['description'])} "
             "The machine-readable document: <a href='/openapi.json'>/openapi.json</a> "
             f"(OpenAPI {_e(document['openapi'])}).</p>"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            parts.append(f"<h2><code>{method.upper()} {_e(path)}</code></h2><p>{_e(operation['summary'])}</p>")
            if operation.get("description"):
                parts.append(f"<p>{_e(operation['description'])}</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                parts.append(_fields_table(schemas[body["schema"]["$ref"].rsplit("/", 1)[1]]))
            rows = "".join(f"<tr><td>{_e(status)}</td><td>{_e(answer['description'])}</td>"
                           f"<td>{_e(', '.join(answer.get('content', {})))}</td></tr>"
                           for status, answer in operation["responses"].items())
            parts.append(f"<table><tr><th>status</th><th>meaning</th><th>content</th></tr>{rows}</table>")
    return "".join(parts) + "</body></html>"


def _fields_table(schema: dict) -> str:
    required = set(schema.get("required", ()))
    rows = []
    for name, prop in schema["properties"].items():
        default = "required" if name in required else json.dumps(prop.get("default"))
        rows.append(f"<tr><td><code>{_e(name)}</code></td><td>{_e(_type(prop))}</td><td>{_e(default)}</td>"
                    f"<td>{_e(_bounds(prop))}</td><td>{_e(prop.get('description', ''))}</td></tr>")
    return ("<table><tr><th>field</th><th>type</th><th>default</th><th>allowed</th><th>description</th></tr>"
            + "".join(rows) + "</table>")


def _type(prop: dict) -> str:
    if "anyOf" in prop:
        return " | ".join(_type(member) for member in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if "$ref" in prop:  # a nested object, e.g. a control: its name
        return prop["$ref"].rsplit("/", 1)[-1]
    return prop.get("type", "enum" if "enum" in prop else "any")


def _bounds(prop: dict) -> str:
    members = prop.get("anyOf", [prop])
    for member in members:
        member = member.get("items", member)
        if "enum" in member:
            return ", ".join(map(str, member["enum"]))
        limits = [f"{word} {member[key]}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                  ("maximum", "<="), ("multipleOf", "multiple of"), ("minLength", "min length"),
                  ("maxLength", "max length")) if key in member]
        if limits:
            return ", ".join(limits)
    return ""


def _e(text) -> str:
    return html.escape(str(text))


_STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .5em;"
          "text-align:left;vertical-align:top}th{background:#f4f4f4}code{font-size:1.05em}")


def fields_markdown(pipelines: Sequence[str]) -> str:
    """The request fields of `pipelines` as one Markdown table (field, pipelines, type and range,
    default per pipeline, meaning), as docs/serving.md shows them."""
    rows: dict[str, dict[str, dict]] = {}
    for name in pipelines:
        schema = REQUEST_MODELS[name].model_json_schema()
        for field, prop in schema["properties"].items():
            rows.setdefault(field, {})[name] = {**prop, "required": field in schema.get("required", ())}
    lines = ["| field | pipelines | type, range | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for field, per_pipeline in rows.items():
        first = next(iter(per_pipeline.values()))
        which = "all" if len(per_pipeline) == len(pipelines) else ", ".join(per_pipeline)
        default = _per_pipeline(per_pipeline, lambda prop: "required" if prop["required"] else
                                json.dumps(prop.get("default")))
        meaning = _per_pipeline(per_pipeline, lambda prop: prop.get("description", ""))
        kind = " ".join(filter(None, [_type(first), _bounds(first)]))
        lines.append(f"| `{field}` | {which} | {_cell(kind)} | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def _per_pipeline(per_pipeline: dict[str, dict], text_of) -> str:
    """One text when every pipeline agrees, else 'text (pipelines); other (pipelines)'."""
    texts: dict[str, list[str]] = {}
    for name, prop in per_pipeline.items():
        texts.setdefault(text_of(prop), []).append(name)
    if len(texts) == 1:
        return next(iter(texts))
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in texts.items())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    """Print the OpenAPI document of every pipeline (or, with --fields, the Markdown fields table)."""
    from runtime.pipelines import PIPELINES

    parser = argparse.ArgumentParser(prog="python -m runtime.serve.openapi", description=__doc__.split("\n")[0])
    parser.add_argument("--fields", action="store_true", help="the request fields as a Markdown table")
    args = parser.parse_args(argv)
    names = list(PIPELINES)
    print(fields_markdown(names) if args.fields else json.dumps(openapi_document(names), indent=1), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
