"""Request and response schemas of the HTTP service (pydantic v2), shared by uvicorn, Ray Serve and tests.

A request is one JSON object (images as base64 strings) or one multipart form (images as file
parts, every other field a form field with the same name). Unknown fields are rejected, every
float must be finite, and the size is checked against the served profile before queueing.
"""
from __future__ import annotations

import base64
import binascii
import functools
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from runtime.ip_scales import PRESETS
from runtime.pipelines import PIPELINES
from runtime.requests import RequestField, request_fields

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_MESSAGE_CHARS = 2000  # an error message, whatever of the request it quotes


class BadRequest(ValueError):
    """A request the client must fix; `status` is the HTTP status, `kind` the metrics label."""

    def __init__(self, message: str, status: int = 422, kind: str = "invalid_request"):
        super().__init__(shorten(message, MAX_MESSAGE_CHARS))
        self.status = status
        self.kind = kind


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    kept = max(0, limit - 48)
    return f"{text[:kept]}... ({len(text) - kept:,} more characters)"


def decode_base64(text: str, field: str) -> bytes:
    """Standard or URL-safe base64 (a `data:image/...;base64,` prefix is allowed; line breaks and
    spaces, as `base64` wraps it at 76 characters, are ignored) -> bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        text = text.translate(_BASE64_CLEANUP)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} is not valid base64: send the file's bytes base64-encoded "
                         "(base64.b64encode(open(path, 'rb').read()).decode())", 400, "bad_base64") from None


_BASE64_CLEANUP = str.maketrans({"-": "+", "_": "/", "\n": None, "\r": None, " ": None, "\t": None})


SERVE_FIELDS = {  # every endpoint adds them to its pipeline's request: they change nothing in the generation
    "format": (Literal["png", "jpeg", "webp"], Field("png", description="output image encoding")),
    "quality": (int, Field(90, ge=1, le=100, description="JPEG/WebP quality")),
    "output": (Literal["image", "json"], Field(
        "image", description="'image': the encoded image as the body (num_images=1); 'json': base64 images")),
    "timeout_s": (Optional[float], Field(None, gt=0, description="give up (504) after this long; <= server limit")),
}


class ServeFields(BaseModel):
    """The base of every HTTP body: the pipeline's request fields, then `SERVE_FIELDS` (how the
    answer is encoded and how long to wait)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image_fields: typing.ClassVar[tuple[str, ...]] = ()
    control_fields: typing.ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value, info):
        return value if info.field_name in cls.text_fields() else no_booleans(value)

    @classmethod
    def text_fields(cls) -> set[str]:
        """Fields whose value is text (strings, choices, base64 images): true/false is not refused there
        as a number's would be (the type check says what is wrong)."""
        return {name for name, info in cls.model_fields.items()
                if name in cls.image_fields or _holds_text(info.annotation)}

    def generation_fields(self) -> dict:
        """The sent request's fields of the pipeline (images excluded: they arrive decoded)."""
        names = [name for name in type(self).model_fields if name not in SERVE_FIELDS
                 and name not in self.image_fields]
        return {name: [control.model_dump() for control in getattr(self, name)] if name in self.control_fields
                else getattr(self, name) for name in names}

    def check(self) -> None:
        """Cross-field rules of the serving fields; raises BadRequest."""
        if self.output == "image" and self.num_images > 1:
            raise BadRequest(f"num_images={self.num_images} needs output='json' (one body holds one image)")


def _holds_text(annotation) -> bool:
    members = typing.get_args(annotation) or (annotation,)
    return str in members or typing.get_origin(annotation) is Literal


def no_booleans(value):
    """A number field's raw value, refused when it is (or holds) a JSON true/false: pydantic would
    read true as 1, so `"steps": true` would run one step instead of saying what is wrong."""
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise ValueError("must be a number, not true/false")
    return value


@functools.cache
def http_model(request_type: type) -> type[ServeFields]:
    """The pydantic model of a pipeline's HTTP body, named as `request_type`: each of its fields
    (runtime/requests.py: type, default, bounds, choices, help) then `SERVE_FIELDS`. Images are
    base64 strings (JSON) or file parts (multipart), so they are optional here and checked once
    the body is read."""
    specs = request_fields(request_type)
    definitions = {spec.name: (_http_type(spec), _http_field(spec)) for spec in specs}
    model = create_model(request_type.__name__, __base__=ServeFields, __doc__=request_type.__doc__,
                         __module__=__name__, **definitions, **SERVE_FIELDS)
    model.image_fields = tuple(spec.name for spec in specs if spec.param.image)
    model.control_fields = tuple(spec.name for spec in specs if spec.param.controls)
    return model


class Control(BaseModel):
    """One extra ControlNet of a request (runtime.controlnets.Control): the build's ControlNet `name`, its
    control image and scale; `preprocess` 'canny' computes the canny map of a photo on the server."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=32, description="a ControlNet of the build (controlnet_<name>)")
    image: str = Field(min_length=1, description="the control image: base64 (JSON), or '@PART' naming a file part "
                                                 "of a multipart body")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="its conditioning scale")
    preprocess: Literal["none", "canny"] = Field("none", description="'none': the image is the control map; "
                                                                     "'canny': its canny map is computed")
    low: int = Field(100, ge=0, le=1000, description="canny's low threshold")
    high: int = Field(200, ge=0, le=1000, description="canny's high threshold")


def _http_type(spec: RequestField):
    rule = spec.param
    if rule.image:
        return Optional[str]
    if rule.controls:
        return list[Control]
    if rule.per_layer:  # a number, one per layer, a diffusers block dict or a preset (runtime/ip_scales.py)
        value = Annotated[float, Field(ge=rule.ge, le=rule.le)]
        return Union[value, Annotated[list[value], Field(min_length=1)], dict[str, Any], Literal[tuple(PRESETS)]]
    if rule.choices is not None:
        return Literal[rule.choices()]  # type: ignore[valid-type]
    return spec.type


def _http_field(spec: RequestField):
    rule = spec.param
    if rule.image:
        needed = "; required" if spec.required else ""
        return Field(None, description=f"{rule.help}: base64 (JSON) or a file part (multipart){needed}")
    if rule.controls:
        from runtime.controlnets import MAX_CONTROLS

        return Field([], max_length=MAX_CONTROLS, description=rule.help + " (multipart: JSON text, "
                     "images as '@PART' file parts)")
    bounds = {} if rule.per_layer else {"ge": rule.ge, "le": rule.le, "multiple_of": rule.multiple_of,
                                        "max_length": rule.max_length}
    required = {"min_length": 1} if spec.required else {}  # a required text is not empty
    return Field(... if spec.required else spec.default, description=rule.help, **required,
                 **{key: value for key, value in bounds.items() if value is not None})


REQUEST_MODELS = {name: http_model(entry.request_type) for name, entry in PIPELINES.items()}
IMAGE_FIELDS = {name: model.image_fields for name, model in REQUEST_MODELS.items()}
CONTROL_FIELDS = {name: model.control_fields for name, model in REQUEST_MODELS.items()}


class ImageOut(BaseModel):
    """One generated image in a JSON response."""

    data: str = Field(description="base64 of the encoded image")
    width: int
    height: int


class GenerateResponse(BaseModel):
    """The JSON response (output='json')."""

    pipeline: str
    format: str
    seed: int
    images: list[ImageOut]
    timings_ms: dict[str, float] = Field(description="decode, queue, run, encode, total")
    warnings: list[str] = Field(default_factory=list, description="what the images did not get, e.g. a prompt "
                                "truncated to the engine's text length (how many tokens, how to raise it)")


class ErrorBody(BaseModel):
    """What went wrong: the HTTP status, a stable kind (the metrics label) and a message saying what to do."""

    status: int
    kind: str
    message: str


class ErrorResponse(BaseModel):
    """Every non-2xx answer: {"error": {"status", "kind", "message"}}."""

    error: ErrorBody


def _off_member(error: dict) -> bool:
    """False for the error of the union member that matches the input's kind (list or not)."""
    loc = error.get("loc", ())
    sent_a_list = isinstance(error.get("input"), list) or len(loc) > 2  # loc[2]: an item's index
    return len(loc) > 1 and isinstance(loc[1], str) and ("list" in loc[1]) != sent_a_list


def format_validation_errors(errors: list[dict]) -> str:
    """pydantic's error list -> one line: 'steps: Input should be >= 1; foo: unknown field' (one per field)."""
    parts, seen = [], set()
    for error in sorted(errors, key=_off_member):  # a union field reports once per member type:
        loc = error.get("loc", ())                  # keep the member of the input's kind (a list: the list)
        where = shorten(str(loc[0]), 64) if loc else "body"  # an unknown field's name is the client's text
        if len(loc) > 2 and isinstance(loc[1], int) and all(isinstance(part, str) for part in loc[2:]):
            where += f"[{loc[1]}]." + shorten(".".join(loc[2:]), 64)  # a list of objects: controls[0].scale
        if where in seen:
            continue
        seen.add(where)
        if error.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field (see GET /v1/schema for the accepted fields)")
        elif error.get("type") == "multiple_of" and isinstance(error.get("input"), int):
            step = error["ctx"]["multiple_of"]
            parts.append(f"{where}: must be a multiple of {step} (e.g. {max(step, round(error['input'] / step) * step)})")
        else:
            parts.append(f"{where}: {shorten(error.get('msg', 'invalid'), 300)}")
    return shorten("; ".join(parts), MAX_MESSAGE_CHARS)
