"""From an HTTP body to the pipeline's request object: content types, size limits, image decoding.

Everything here raises `BadRequest(message, status, kind)`; the app turns it into the JSON error.
Images are decoded here (on a request thread, not the GPU worker), with the pixel count checked
from the header before decoding (413), sides and aspect ratio too (422), and corrupt or truncated
files refused (422). A request's output size, cost (megapixel-steps) and, on ONNX Runtime, the
memory its attention needs are checked before its photos are decoded when it gives its size.
"""
from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request

from runtime.images import ImageError, instantid_size, load_image, model_size
from runtime.pipelines import PIPELINES
from runtime.requests import GenerateRequest, LoopSettings, loop_settings
from runtime.serve.capacity import Limits, memory_shortfall
from runtime.serve.schemas import (CONTROL_FIELDS, IMAGE_FIELDS, REQUEST_MODELS, BadRequest, ServeFields,
                                   decode_base64, format_validation_errors, shorten)

MAX_JSON_SEPARATORS = 50_000  # '[', '{', ',' and ':' in a JSON body: a request has a few hundred at most
MEGAPIXEL = 2**20  # cost unit: one 1024 x 1024 image for one step


def parse_fields(content_type: str, body: bytes, form: dict[str, Any] | None) -> dict[str, Any]:
    """JSON object (application/json) or already-parsed multipart form -> a field dict.

    Multipart file parts arrive as bytes; the caller parsed the form (it needs the ASGI stream).
    """
    if content_type == "application/json":
        separators = sum(body.count(char) for char in (b"[", b"{", b",", b":"))
        if separators > MAX_JSON_SEPARATORS:
            raise BadRequest(f"the JSON body has {separators:,} '[', '{{', ',' and ':', the limit is "
                             f"{MAX_JSON_SEPARATORS:,}: send one object of the request's fields (images as base64 "
                             "strings)", 400, "bad_json")
        try:
            fields = json.loads(body, parse_constant=_reject_constant, object_pairs_hook=_object)
        except DuplicateField as error:
            raise BadRequest(f"field {shorten(repr(error.args[0]), 80)} is given twice: send each field once", 400,
                             "duplicate_field") from None
        except RecursionError:
            raise BadRequest("the JSON body is nested too deeply (hundreds of levels): send one object whose "
                             "values are strings, numbers or one list of numbers", 400, "bad_json") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(f"the body is not valid JSON ({shorten(str(error), 200)}): send one JSON object", 400,
                             "bad_json") from None
        if not isinstance(fields, dict):
            raise BadRequest("the JSON body must be an object of fields, e.g. {\"prompt\": ..., \"image\": ...}",
                             400, "bad_json")
        return fields
    if form is not None:
        return form
    raise BadRequest(f"unsupported Content-Type {content_type or '(none)'!r}: send application/json (images "
                     "base64) or multipart/form-data (images as file parts)", 415, "unsupported_media_type")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number: every value must be finite")


class DuplicateField(ValueError):
    """A JSON object names one key twice (json.loads would keep the last silently)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if key in fields:
            raise DuplicateField(key)
        fields[key] = value
    return fields


def validate(pipeline: str, fields: dict[str, Any]) -> tuple[ServeFields, dict[str, bytes]]:
    """Fields -> (validated HTTP body, {image field: encoded bytes}). 422 names each bad field; the
    pipeline's own cross-field rules (runtime/requests.py) are checked here too, before any decoding."""
    model = REQUEST_MODELS[pipeline]
    images: dict[str, bytes] = {}
    text_fields = {}
    fields, parts = _control_parts(pipeline, fields)
    for name, value in fields.items():
        if name in IMAGE_FIELDS[pipeline] and isinstance(value, (bytes, bytearray)):
            images[name] = bytes(value)
        else:
            text_fields[name] = value
    try:
        body = model.model_validate(text_fields)
    except ValidationError as error:
        raise BadRequest(format_validation_errors(error.errors()), 422, "invalid_request") from None
    body.check()
    to_request(pipeline, body, {})
    for name in IMAGE_FIELDS[pipeline]:
        value = getattr(body, name)
        if value is not None:
            images[name] = decode_base64(value, name)
    for name in CONTROL_FIELDS[pipeline]:  # each control's image under '@<field>[<i>]' (decoded with the photos)
        for index, control in enumerate(getattr(body, name)):
            where = f"{name}[{index}].image"
            if control.image.startswith("@"):
                if control.image[1:] not in parts:
                    raise BadRequest(f"{where} names the file part {shorten(control.image[1:], 80)!r}, which the "
                                     f"multipart body does not have: send it, or the image as base64", 422,
                                     "missing_image")
                images[f"@{where}"] = parts[control.image[1:]]
            else:
                images[f"@{where}"] = decode_base64(control.image, where)
    if "image" not in images:
        raise BadRequest("no image: send the photo as the 'image' file part (multipart) or as base64 in "
                         "the 'image' field (JSON)", 422, "missing_image")
    return body, images


def _control_parts(pipeline: str, fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(fields, file parts) with a control list sent as JSON text (multipart) parsed, and the file parts its
    images name ('@PART') taken out of the fields."""
    fields, parts = dict(fields), {}
    for name in CONTROL_FIELDS[pipeline]:
        value = fields.get(name)
        if isinstance(value, str):
            try:
                fields[name] = value = json.loads(value)
            except ValueError:
                raise BadRequest(f"{name} is not valid JSON: send a JSON list of {{name, image, scale, preprocess}} "
                                 "objects", 422, "invalid_request") from None
        for control in value if isinstance(value, list) else ():
            image = control.get("image") if isinstance(control, dict) else None
            if isinstance(image, str) and image.startswith("@") and isinstance(fields.get(image[1:]), bytes):
                parts[image[1:]] = fields.pop(image[1:])
    return fields, parts


def to_request(pipeline: str, body: ServeFields, images: dict[str, Any]) -> GenerateRequest:
    """The pipeline's request object (`runtime.pipelines.PIPELINES[pipeline].request_type`) from a
    validated body and the decoded images; BadRequest (422) for what its own rules refuse."""
    images = {**{name: None for name in body.image_fields}, **images}  # None: not decoded yet (a check)
    try:
        return PIPELINES[pipeline].request_type(**body.generation_fields(), **images)
    except ValueError as error:  # RequestError, ResolutionError
        raise BadRequest(str(error), 422, "invalid_request") from None


def batch_key(pipeline: str, request: GenerateRequest) -> tuple[str, LoopSettings]:
    """Requests with equal keys share one denoising loop: the pipeline and the request's loop settings
    at its output size (`runtime.requests.loop_settings`); the request's width and height are set."""
    return pipeline, loop_settings(request, request.height, request.width)


def decode_image(data: bytes, field: str, limits: Limits) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB. 413 above limits.max_image_pixels; 422 beyond
    max_image_side / max_image_aspect or if unreadable (all from the header, before decoding)."""
    if not data:
        raise BadRequest(f"{field} is empty (0 bytes): send the whole file", 422, "bad_image")
    size, pixels = "", 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
                size, pixels = f"{width}x{height} = ", width * height
        except Image.DecompressionBombError as error:  # PIL's own limit, far above ours: its message has the count
            found = re.search(r"\((\d+) pixels\)", str(error))
            size, pixels = ("", int(found.group(1))) if found else ("over ", 2 * Image.MAX_IMAGE_PIXELS)
        except (OSError, ValueError):
            pass  # load_image below says what is wrong
    if pixels > limits.max_image_pixels:
        raise BadRequest(f"{field} has {size}{pixels:,} pixels, the limit is {limits.max_image_pixels:,}: downscale "
                         "it (a face photo needs a few megapixels at most)", 413, "image_too_large")
    try:
        return load_image(data, max_pixels=limits.max_image_pixels, max_side=limits.max_image_side,
                          max_aspect=limits.max_image_aspect)
    except ImageError as error:
        raise BadRequest(f"{field}: {error}", 422, "bad_image") from None


def check_size(width: int, height: int, request: ServeFields, limits: Limits) -> None:
    """The output size against the served sides, the cost budget and (ONNX Runtime) the memory its
    attention needs; raises BadRequest (422) saying the limit, the request's figure, what to lower."""
    given = "" if request.width is not None else " (give width and height)"
    if not (limits.min_side <= width <= limits.max_side and limits.min_side <= height <= limits.max_side):
        raise BadRequest(f"{width}x{height} is outside the served sizes ({limits.min_side}..{limits.max_side} px per "
                         f"side, set by {limits.max_side_source}): ask for a size inside it{given}",
                         422, "size_out_of_profile")
    cost = width * height / MEGAPIXEL * request.steps * request.num_images
    if cost > limits.max_cost:
        raise BadRequest(f"this request costs {width}x{height} px x {request.steps} steps x {request.num_images} "
                         f"image(s) = {cost:,.1f} megapixel-steps (1 MP = 1024x1024 px), the limit is "
                         f"{limits.max_cost:g} (--max-cost): lower steps, num_images or width/height{given}",
                         422, "over_budget")
    short = memory_shortfall(limits, width, height, request.num_images, request.guidance)
    if short is not None:
        need, side = short
        raise BadRequest(f"{width}x{height} with {request.num_images} image(s) needs about {need / 2**30:.1f} GiB "
                         f"for ONNX Runtime's attention, this server has {limits.memory_bytes / 2**30:.1f} GiB per "
                         f"request: ask for at most {side}x{side} px at {request.num_images} image(s) (the need grows "
                         f"with (width x height)^2), or fewer images{given}", 422, "over_memory")


def resolve_request(pipeline: str, body: ServeFields, images: dict[str, bytes], limits: Limits,
                    default_size: int | None, resolution: int = 1024) -> tuple[GenerateRequest, tuple]:
    """Decode the images and fix the output size -> (the pipeline's request, its batch key).

    InstantID: the photos are passed as decoded (each keeps its own size: the pipeline detects faces
    at the reference's detection size, `runtime.pipelines.face_conditioning`); without a size the
    output is the pose photo's (else the face photo's) InstantID size at the model's `resolution`.
    A photo too elongated for InstantID's resize is refused here (422).
    """
    width, height = body.width, body.height
    if width is None and default_size is not None:
        width = height = default_size
    if width is not None:  # known before decoding: refused before any photo is decoded
        check_size(width, height, body, limits)
    decoded = {name: decode_image(data, name.lstrip("@"), limits) for name, data in images.items()}
    controls = {name: decoded.pop(name) for name in list(decoded) if name.startswith("@")}  # control images
    if default_size is None:  # InstantID: every photo must survive the detection resize
        try:
            for photo in decoded.values():
                instantid_size(photo.shape[1], photo.shape[0])
            if width is None:  # the size follows the (pose) photo, as the runtime's
                source = decoded.get("pose_image", decoded["image"])
                width, height = model_size(source.shape[1], source.shape[0], resolution)
        except ImageError as error:
            raise BadRequest(str(error), 422, "bad_image") from None
        if body.width is None:
            check_size(width, height, body, limits)
    request = replace(to_request(pipeline, body, decoded), width=width, height=height)
    for name in CONTROL_FIELDS[pipeline]:
        given = getattr(request, name)
        images = [controls[f"@{name}[{index}].image"] for index in range(len(given))]
        request = replace(request, **{name: tuple(replace(c, image=image) for c, image in zip(given, images))})
    return request, batch_key(pipeline, request)


async def read_fields(request: Request, limits: Limits) -> dict:
    """The body, at most limits.max_body_bytes (413 beyond, checked as it streams), as a field dict."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BadRequest(f"the body is {int(declared):,} bytes, the limit is {limits.max_body_bytes:,}: send a "
                         "smaller (downscaled, JPEG) photo", 413, "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise BadRequest(f"the body is over the limit: {size:,} bytes received so far, the limit is "
                             f"{limits.max_body_bytes:,}: send a smaller (downscaled, JPEG) photo", 413,
                             "body_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form = None
    if content_type == "multipart/form-data":
        form = await parse_form(request, body, limits)
    return parse_fields(content_type, body, form)


async def parse_form(request: Request, body: bytes, limits: Limits) -> dict:
    """Multipart body -> {field: str | bytes (file parts)}; repeated fields are refused."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=8, max_fields=64,
                                                         max_part_size=limits.max_body_bytes)
    except (MultiPartException, HTTPException) as error:
        detail = getattr(error, "message", None) or getattr(error, "detail", error)
        raise BadRequest(f"the multipart body could not be parsed ({detail}): send a "
                         "multipart/form-data body with a boundary", 400, "bad_multipart") from None
    fields: dict = {}
    for key, value in form.multi_items():
        if key in fields:
            raise BadRequest(f"field {shorten(repr(key), 80)} is given twice: send each field once", 400,
                             "duplicate_field")
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    await form.close()
    return fields
