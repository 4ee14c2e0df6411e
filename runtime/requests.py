"""One request type per pipeline: its fields, defaults and checks, written once.

    request = InstantIDRequest("photo.jpg", "a portrait, oil painting", steps=20, seed=3)
    images = pipe(request)                    # the same as pipe("photo.jpg", "a portrait, ...", steps=20, seed=3)

Every field carries a `Param` (help text, bounds, choices, whether it is a loop setting) from
which the rest is derived, so a field is declared here only (the pipeline code that uses its
value reads it from the request):
  - the Python API: the pipelines' keyword calls build the request (`as_request`);
  - the CLI flags and their help (`runtime/__main__.py`, `add_request_arguments`);
  - the HTTP schema, the OpenAPI document and /docs (`runtime/serve/schemas.py`, `openapi.py`),
    and docs/serving.md's field table (`python -m runtime.serve.openapi --fields`);
  - `LoopSettings`, what requests sharing one denoising loop must agree on, and so the server's batch
    key: the output size and the fields marked `loop=True` (`loop_settings`);
  - the benchmarks' settings (`benchmarks/stages.py` makes the request, at its defaults).
"""
from __future__ import annotations

import functools
import math
import numbers
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional, Union

from runtime.controlnets import Control, ControlError, as_controls
from runtime.images import ImageSource
from runtime.ip_scales import PRESETS, BlockScales, BlockScaleError, parse_block_scales

PIXEL_MULTIPLE = 64
MAX_PROMPT_CHARS = 4000


class RequestError(ValueError):
    """A request field is outside its bounds or choices; the message names the field and what to give."""


class ResolutionError(ValueError):
    """The requested image size cannot be served by this build."""


def _schedulers() -> tuple[str, ...]:
    from runtime.schedulers import SCHEDULERS  # read when asked: the scheduler registry may grow

    return tuple(SCHEDULERS)


@dataclass(frozen=True)
class Param:
    """How one request field is checked and shown (Python, CLI, HTTP schema, docs).

    ge / le: inclusive bounds of a number (of each value of a per-layer list); multiple_of: of an int;
    max_length: of a string; choices: a callable returning the allowed strings (read when used).
    loop: requests must agree on it to share one denoising loop (part of `LoopSettings`).
    image: an image (Python: path, bytes, PIL or RGB array; CLI: a path; HTTP: base64 or a file part).
    per_layer: a float, one float per cross-attention layer (kept as a tuple), or per UNet block: a diffusers
        block dict or a preset name (kept as `runtime.ip_scales.BlockScales`; JSON text of either is read too).
    flags: more CLI names than `--field-name` (e.g. '--face').
    controls: a list of extra ControlNet controls (`runtime.controlnets.Control`: name, image, scale, preprocess,
        low, high; kept as a tuple of them; HTTP: a list of objects, images base64; CLI: repeatable --control).
    """

    help: str
    ge: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    max_length: int | None = None
    choices: Callable[[], tuple[str, ...]] | None = None
    loop: bool = False
    image: bool = False
    per_layer: bool = False
    flags: tuple[str, ...] = ()
    controls: bool = False


def param(default: Any = MISSING, **spec) -> Any:
    """A dataclass field with its `Param` (spec: Param's fields). Images are left out of the request's
    equality, hash and repr: requests are equal when their settings are."""
    image = spec.get("image", False)
    return field(default=default, compare=not image, repr=not image, metadata={"param": Param(**spec)})


@dataclass(frozen=True)
class RequestField:
    """One field as the derivations see it: name, Python type, default (MISSING: required), Param."""

    name: str
    type: Any
    default: Any
    param: Param

    @property
    def required(self) -> bool:
        return self.default is MISSING


@functools.cache
def request_fields(request_type: type) -> tuple[RequestField, ...]:
    """The fields of a request type, in order, with their resolved types."""
    hints = typing.get_type_hints(request_type)
    return tuple(RequestField(f.name, hints[f.name], f.default, f.metadata["param"]) for f in fields(request_type))


@dataclass(frozen=True)
class GenerateRequest:
    """The fields every pipeline has; sizes in pixels. Subclasses add their own and may change a
    field's default or help by declaring it again (it keeps its position)."""

    image: ImageSource | None = param(image=True, help="the image that prompts the generation", flags=("--face",))
    prompt: str = param(help="text prompt", max_length=MAX_PROMPT_CHARS)
    negative_prompt: Optional[str] = param(None, max_length=MAX_PROMPT_CHARS,
                                           help="negative prompt; none: the model's default negative (SDXL: a zero embedding)")
    steps: int = param(30, ge=1, le=150, loop=True, help="denoising steps")
    guidance: float = param(5.0, ge=0.0, le=30.0, loop=True, help="classifier-free guidance; <= 1 disables CFG")
    ip_scale: Union[float, tuple[float, ...], BlockScales] = param(
        0.6, ge=0.0, le=4.0, loop=True, per_layer=True,
        help="λ of the image tokens: one value, one per cross-attention layer, a diffusers block dict (InstantStyle, "
        "e.g. {\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}; layers it does not name: 0) or a preset: " + ", ".join(PRESETS))
    seed: int = param(0, ge=0, le=2**63 - 1, help="seed of the initial noise (one generator for the request's images)")
    width: Optional[int] = param(None, ge=PIXEL_MULTIPLE, le=8192, multiple_of=PIXEL_MULTIPLE,
                                 help="output width in px, with height; none: the model's resolution, square")
    height: Optional[int] = param(None, ge=PIXEL_MULTIPLE, le=8192, multiple_of=PIXEL_MULTIPLE,
                                  help="output height in px, with width")
    num_images: int = param(1, ge=1, le=16, help="images generated from this request")
    scheduler: str = param("euler", choices=_schedulers, loop=True, help="scheduler preset (runtime/schedulers.py)")
    controls: tuple[Control, ...] = param(
        (), controls=True, loop=True, flags=("--control",),
        help="extra ControlNets of the build (exported with --controlnet NAME=PATH), each {name, image, scale "
        "(default 1), preprocess: 'none' (the image is the control map) or 'canny' (its canny map is computed, "
        "thresholds low/high, default 100/200)}; residuals summed with the IdentityNet's")

    def __post_init__(self):
        for spec in request_fields(type(self)):
            value = getattr(self, spec.name)
            if value is None:
                if spec.required and not spec.param.image:
                    raise RequestError(f"{spec.name} is required: {spec.param.help}")
                continue
            object.__setattr__(self, spec.name, _checked(spec, value))
        if (self.width is None) != (self.height is None):
            raise RequestError("give both width and height (the output size), or neither (the pipeline's "
                               "default size)")
        if self.width is not None and (self.width % PIXEL_MULTIPLE or self.height % PIXEL_MULTIPLE):
            raise ResolutionError(f"{self.width}x{self.height} is not a multiple of {PIXEL_MULTIPLE} px on both "
                                  f"sides: round the size, e.g. to {round_size(self.width)}x{round_size(self.height)}")


def round_size(size: int) -> int:
    """The nearest multiple of PIXEL_MULTIPLE px (at least one)."""
    return max(PIXEL_MULTIPLE, int(round(size / PIXEL_MULTIPLE)) * PIXEL_MULTIPLE)


def _checked(spec: RequestField, value: Any) -> Any:
    """`value` normalised to the field's type (ints, floats, per-layer tuples), or RequestError."""
    name, rule = spec.name, spec.param
    if rule.image:
        return value
    if rule.controls:
        try:
            return as_controls(value)
        except (ControlError, TypeError) as error:
            raise RequestError(f"{name}: {error}") from None
    if rule.per_layer:
        if isinstance(value, str) and value not in PRESETS:
            value = _json_scale(name, value)
        if isinstance(value, (str, dict, BlockScales)):
            try:
                return parse_block_scales(value, rule.ge, rule.le)
            except BlockScaleError as error:
                raise RequestError(str(error)) from None
        if not isinstance(value, (int, float, list, tuple)):
            raise RequestError(f"{name} must be a number, a list of numbers, a block dict or a preset name "
                               f"({', '.join(PRESETS)}), got {type(value).__name__}")
        values = [value] if isinstance(value, (int, float)) else list(value)
        if not values:
            raise RequestError(f"{name} is empty: give one value, or one per cross-attention layer")
        checked = [_number(name, v, float, rule) for v in values]
        return checked[0] if isinstance(value, (int, float)) else tuple(checked)
    kind = next(t for t in (int, float, str) if t in _members(spec.type))
    if kind is str:
        if not isinstance(value, str):
            raise RequestError(f"{name} must be a string, got {type(value).__name__}")
        if rule.max_length is not None and len(value) > rule.max_length:
            raise RequestError(f"{name} has {len(value):,} characters, the limit is {rule.max_length:,}: shorten it")
        if rule.choices is not None and value not in rule.choices():
            raise RequestError(f"{name} {value!r} is not one of {', '.join(rule.choices())}")
        return value
    return _number(name, value, kind, rule)


def _json_scale(name: str, text: str) -> Any:
    """A scale given as text (a form field, a CLI flag): JSON of a number, list or block dict."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        raise RequestError(f"{name} {text[:80]!r} is neither a preset ({', '.join(PRESETS)}) nor JSON of a number, "
                           "a list or a block dict") from None


def _members(annotation) -> tuple:
    return typing.get_args(annotation) or (annotation,)


def _number(name: str, value: Any, kind: type, rule: Param) -> int | float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"{name} must be a number, got {value!r}")
    if kind is int:
        if not isinstance(value, numbers.Integral):
            raise RequestError(f"{name} must be a whole number, got {value!r}")
        number = int(value)
    else:
        number = float(value)
        if not math.isfinite(number):
            raise RequestError(f"{name} must be finite, got {number}")
    if (rule.ge is not None and number < rule.ge) or (rule.le is not None and number > rule.le):
        raise RequestError(f"{name}={number} is outside {_bound(rule.ge)}..{_bound(rule.le)}: give a value inside")
    return number


def _bound(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@dataclass(frozen=True)
class InstantIDRequest(GenerateRequest):
    """InstantID: identity from the face photo `image`, pose from `pose_image` or the same face."""

    image: ImageSource | None = param(image=True, flags=("--face",),
                                      help="face photo: the identity, and the pose unless pose_image is given")
    ip_scale: Union[float, tuple[float, ...], BlockScales] = param(
        0.8, ge=0.0, le=4.0, loop=True, per_layer=True,
        help="λ of the face tokens: one value, one per cross-attention layer, a diffusers block dict (InstantStyle, "
        "e.g. {\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}; layers it does not name: 0) or a preset: " + ", ".join(PRESETS))
    width: Optional[int] = param(None, ge=PIXEL_MULTIPLE, le=8192, multiple_of=PIXEL_MULTIPLE,
                                 help="output width in px, with height; none: the pose photo's InstantID size at "
                                 "the model's resolution")
    pose_image: ImageSource | None = param(None, image=True, flags=("--pose",),
                                           help="a second photo whose face sets the pose (keypoints)")
    controlnet_scale: float = param(0.8, ge=0.0, le=4.0, loop=True, help="IdentityNet (ControlNet) strength")
    control_guidance_start: float = param(0.0, ge=0.0, le=1.0, loop=True,
                                          help="fraction of the steps after which the IdentityNet starts (diffusers' "
                                          "window: step i runs it when i/steps >= start and (i+1)/steps <= end)")
    control_guidance_end: float = param(1.0, ge=0.0, le=1.0, loop=True,
                                        help="fraction of the steps after which the IdentityNet stops (e.g. 0.6: "
                                        "the last 40 % of the steps run without it, faster)")
    face_index: Optional[int] = param(None, ge=0, help="which face of the photo, largest first; none: the largest")

    def __post_init__(self):
        super().__post_init__()
        if self.control_guidance_start >= self.control_guidance_end:
            raise RequestError(f"control_guidance_start ({self.control_guidance_start}) must be below "
                               f"control_guidance_end ({self.control_guidance_end}): the IdentityNet runs between them")


@dataclass(frozen=True)
class IPAdapterRequest(GenerateRequest):
    """IP-Adapter (plain or Plus): the reference image `image` prompts the generation."""

    image: ImageSource | None = param(image=True, flags=("--face",), help="reference image")


@dataclass(frozen=True)
class LoopSettings:
    """What requests sharing one denoising loop must agree on: the output size in pixels and the
    request's fields marked `loop=True`, as (name, value) pairs read as attributes
    (`settings.steps`, `settings.ip_scale`: a float, a per-layer tuple or BlockScales)."""

    height: int
    width: int
    values: tuple[tuple[str, Any], ...]

    def __getattr__(self, name: str) -> Any:
        for key, value in self.__dict__.get("values", ()):
            if key == name:
                return value
        raise AttributeError(f"LoopSettings has no {name!r} (its fields: height, width, "
                             f"{', '.join(k for k, _ in self.__dict__.get('values', ()))})")

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in (("height", self.height), ("width", self.width), *self.values))


def loop_settings(request: GenerateRequest, height: int, width: int) -> LoopSettings:
    """The loop settings of `request` at its output size H x W (pixels)."""
    values = tuple((f.name, getattr(request, f.name)) for f in request_fields(type(request)) if f.param.loop)
    return LoopSettings(int(height), int(width), values)


def as_request(request_type: type, request_or_image: Any, prompt: str | None, negative_prompt: str | None,
               options: dict[str, Any]) -> GenerateRequest:
    """A request of `request_type`: the one given (then nothing else may be), or one built from the
    keyword form (image, prompt, negative_prompt, **options)."""
    if isinstance(request_or_image, GenerateRequest):
        if not isinstance(request_or_image, request_type):
            raise TypeError(f"this pipeline takes a {request_type.__name__}, got a {type(request_or_image).__name__}")
        if prompt is not None or negative_prompt is not None or options:
            raise TypeError("pass either a request object or the fields as arguments, not both")
        return request_or_image
    return request_type(request_or_image, prompt, negative_prompt, **options)


def field_default(request_type: type, name: str) -> Any:
    """The default of field `name` of `request_type` (what a request that does not say gets)."""
    for spec in request_fields(request_type):
        if spec.name == name:
            return spec.default
    raise KeyError(f"{request_type.__name__} has no field {name!r}")
