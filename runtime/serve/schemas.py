"""Request and response schemas of the HTTP service (pydantic v2), shared by uvicorn, Ray Serve and tests.

A request is one JSON object (images as base64 strings) or one multipart form (images as file
parts, every other field a form field with the same name). Unknown fields are rejected, every
float must be finite, and the size is checked against the served profile before queueing.
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.schedulers import SCHEDULERS

PIPELINES = ("instantid", "ip-adapter", "ip-adapter-plus")
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SIDE_MULTIPLE = 64
MAX_MESSAGE_CHARS = 2000  # an error message, whatever of the request it quotes
NUMBER_FIELDS = ("steps", "guidance", "ip_scale", "seed", "width", "height", "num_images", "quality", "timeout_s",
                 "controlnet_scale", "face_index")

Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]


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


class GenerateParams(BaseModel):
    """Generation parameters common to every pipeline (defaults are the runtime CLI's)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=4000, description="text prompt")
    negative_prompt: Optional[str] = Field(None, max_length=4000, description="None = SDXL's zero negative embedding")
    steps: int = Field(30, ge=1, le=150, description="denoising steps")
    guidance: float = Field(5.0, ge=0.0, le=30.0, description="classifier-free guidance; <= 1 disables CFG")
    ip_scale: Optional[Union[float, list[float]]] = Field(
        None, description="λ of the image/face tokens: one value or one per cross-attention layer; "
                          "default 0.8 (instantid), 0.6 (ip-adapter)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    width: Optional[int] = Field(None, ge=SIDE_MULTIPLE, le=8192, description="multiple of 64; with height")
    height: Optional[int] = Field(None, ge=SIDE_MULTIPLE, le=8192, description="multiple of 64; with width")
    num_images: int = Field(1, ge=1, le=16)
    scheduler: Scheduler = "euler"
    format: Literal["png", "jpeg", "webp"] = Field("png", description="output image encoding")
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality")
    output: Literal["image", "json"] = Field(
        "image", description="'image': the encoded image as the body (num_images=1); 'json': base64 images")
    timeout_s: Optional[float] = Field(None, gt=0, description="give up (504) after this long; <= server limit")

    @field_validator(*(name for name in NUMBER_FIELDS if name not in ("controlnet_scale", "face_index")),
                     mode="before")
    @classmethod
    def _not_a_boolean(cls, value):
        return no_booleans(value)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_64(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value % SIDE_MULTIPLE:
            rounded = max(SIDE_MULTIPLE, round(value / SIDE_MULTIPLE) * SIDE_MULTIPLE)
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE} (e.g. {rounded})")
        return value

    @field_validator("ip_scale")
    @classmethod
    def _finite_scales(cls, value):
        values = value if isinstance(value, list) else [value] if value is not None else []
        if any(not math.isfinite(v) or not 0.0 <= v <= 4.0 for v in values):
            raise ValueError("every ip_scale must be a finite number in 0..4")
        if isinstance(value, list) and not value:
            raise ValueError("give one value, or one per cross-attention layer")
        return value

    def check(self) -> None:
        """Cross-field rules pydantic fields cannot express; raises BadRequest."""
        if (self.width is None) != (self.height is None):
            raise BadRequest("give both width and height, or neither (the pipeline's default size)")
        if self.output == "image" and self.num_images > 1:
            raise BadRequest(f"num_images={self.num_images} needs output='json' (one body holds one image)")


class InstantIDRequest(GenerateParams):
    """InstantID: identity (and pose unless pose_image is given) from the face photo `image`."""

    image: Optional[str] = Field(None, description="face photo, base64 (JSON) or a file part (multipart)")
    pose_image: Optional[str] = Field(None, description="optional second photo that sets the pose")
    controlnet_scale: float = Field(0.8, ge=0.0, le=4.0)
    face_index: Optional[int] = Field(None, ge=0, description="which face, largest first; default the largest")

    @field_validator("controlnet_scale", "face_index", mode="before")
    @classmethod
    def _not_a_boolean(cls, value):
        return no_booleans(value)


def no_booleans(value):
    """A number field's raw value, refused when it is (or holds) a JSON true/false: pydantic would
    read true as 1, so `"steps": true` would run one step instead of saying what is wrong."""
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise ValueError("must be a number, not true/false")
    return value


class IPAdapterRequest(GenerateParams):
    """IP-Adapter: the reference image `image` prompts the generation through image tokens."""

    image: Optional[str] = Field(None, description="reference image, base64 (JSON) or a file part (multipart)")


REQUEST_MODELS = {"instantid": InstantIDRequest, "ip-adapter": IPAdapterRequest, "ip-adapter-plus": IPAdapterRequest}
IMAGE_FIELDS = {"instantid": ("image", "pose_image"), "ip-adapter": ("image",), "ip-adapter-plus": ("image",)}


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


class ErrorBody(BaseModel):
    """Every non-2xx answer: {"error": {"status", "kind", "message"}}; message says what to do."""

    status: int
    kind: str
    message: str


def format_validation_errors(errors: list[dict]) -> str:
    """pydantic's error list -> one line: 'steps: Input should be >= 1; foo: unknown field' (one per field)."""
    parts, seen = [], set()
    for error in errors:
        loc = error.get("loc", ())
        where = shorten(str(loc[0]), 64) if loc else "body"  # an unknown field's name is the client's text
        if where in seen:  # a union field reports once per member type: keep the first
            continue
        seen.add(where)
        if error.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field (see GET /v1/schema for the accepted fields)")
        else:
            parts.append(f"{where}: {shorten(error.get('msg', 'invalid'), 300)}")
    return shorten("; ".join(parts), MAX_MESSAGE_CHARS)
