"""Optimisation profiles from pipeline geometry, and the dynamic-axis naming convention.

An engine with dynamic inputs needs, per input, a (min, opt, max) shape. They come from one
`Geometry` (images per request, pixel height/width ranges) and from the *names* the exporter
gives to each dynamic ONNX axis (`dim_param`). This module owns that naming convention.

Naming convention (the exporter names every dynamic axis of every input AND output so)
--------------------------------------------------------------------------------------
A dynamic axis is named by a small expression over these symbols::

    symbol          meaning                                   default range (min, opt, max)
    batch   | B     images per request                        1, 1, 4
    height  | H     image height in pixels (multiple of 64)   512, 1024, 1536
    width   | W     image width in pixels (multiple of 64)    512, 1024, 1536
    latent_height   height / 8 (the VAE factor)               64, 128, 192
    latent_width    width / 8                                 64, 128, 192
    text_tokens     prompt tokens: 77 per chunk of 75 BPE     77, 77, 231
                    tokens (runtime/text.py), so 77·k

    dim := [k] [*] symbol [ (/ | //) d ]   |   symbol * k [ (/ | //) d ]
           k, d positive integers; spaces allowed

Examples: ``batch``; ``2B`` or ``2*batch`` (a component that runs with classifier-free
guidance: uncond + cond stacked, 2..8; over a batch range it starts at batch.min rows, 1..8,
because guidance <= 1 runs one row per image); ``latent_height``; ``latent_height/2`` and
``latent_height/4`` (ControlNet residuals of the 2nd and 3rd down blocks);
``8*latent_height`` (= height, as torch's dynamo exporter writes it).

Rules for the exporter:
- Name *every* dynamic axis, outputs included (the legacy exporter's guessed names for
  outputs can be wrong: a stride-2 output may come out named ``latent_height``).
- Axes that do not depend on geometry (2048 channels, 16 face tokens, the number of ip-scale
  entries, the text encoders' 77 input ids) stay static integers. The one exception is the text
  conditioning a UNet (or a ControlNet that reads the prompt) takes: its token axis is named
  TEXT_TOKENS_AXIS (``text_tokens``), so long prompts run on the same engine; its range is
  ``Geometry.text_tokens`` (``python -m engine ... --text-tokens 77:77:308``).
- Use ``2B`` (or ``2*batch``) exactly where the component's batch carries CFG pairs
  (unet, controlnet); ``batch`` for per-request components (encoders, vae_decoder, arcface).
- Every value must be an integer across the whole range: with the default geometry,
  ``latent_height/8`` is fine (8..24), ``latent_height/16`` at 576 px is not (4.5).

A fixed serving size (the static-shape fast path) is ``Geometry.fixed(batch, height, width)``:
min = opt = max, so TensorRT specialises every kernel for one shape.

The VAE decoder is the exception to ``batch``: the runtime decodes one image per call, so its
profile takes ``Geometry.decode_batch`` (default 1) instead (``Geometry.for_component``). Every
execution context of a pipeline shares one scratch pool sized for the largest engine, and an
fp32 VAE decoder at batch 4 x 1536² would size it at about four times what batch 1 needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

LATENT_FACTOR = 8          # SDXL VAE: latent = pixels / 8
PIXEL_MULTIPLE = 64        # UNet needs latents divisible by 8 (3 downsamplings)
TEXT_TOKENS_AXIS = "text_tokens"  # the dynamic axis of the prompt tokens (UNet `text_tokens`)
TEXT_CHUNK = 77            # one prompt chunk: BOS + 75 tokens + EOS; the text axis is a multiple


class ProfileError(ValueError):
    """A dynamic axis name or a geometry the profiles cannot turn into shapes."""


@dataclass(frozen=True)
class Range:
    """One integer quantity's (min, opt, max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (0 < self.min <= self.opt <= self.max):
            raise ProfileError(f"need 0 < min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


@dataclass(frozen=True)
class ShapeRange:
    """The (min, opt, max) shape of one engine input, as TensorRT's profile takes it."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def is_static(self) -> bool:
        """True when min == opt == max (the static-shape fast path)."""
        return self.min == self.opt == self.max


Profile = dict[str, ShapeRange]    # input name -> shape range; one optimisation profile


@dataclass(frozen=True)
class Geometry:
    """What a served request can look like: images per request and pixel size ranges.

    batch: images per request (CFG doubles it for ``2B`` axes).
    height, width: pixels, multiples of 64; latent sizes are these / 8.
    decode_batch: images per VAE decoder call (the runtime decodes one at a time).
    text_tokens: prompt tokens the UNet takes, multiples of 77 (one chunk each); the max is the
        longest prompt served untruncated (231: 3 chunks, 225 BPE tokens).
    """

    batch: Range = field(default_factory=lambda: Range(1, 1, 4))
    height: Range = field(default_factory=lambda: Range(512, 1024, 1536))
    width: Range = field(default_factory=lambda: Range(512, 1024, 1536))
    decode_batch: Range = field(default_factory=lambda: Range(1, 1, 1))
    text_tokens: Range = field(default_factory=lambda: Range(TEXT_CHUNK, TEXT_CHUNK, 3 * TEXT_CHUNK))

    def __post_init__(self):
        for name, multiple, unit in (("height", PIXEL_MULTIPLE, "px"), ("width", PIXEL_MULTIPLE, "px"),
                                     ("text_tokens", TEXT_CHUNK, "tokens")):
            value = getattr(self, name)
            bad = [v for v in (value.min, value.opt, value.max) if v % multiple]
            if bad:
                raise ProfileError(f"{name} {bad} is not a multiple of {multiple} {unit}; "
                                   f"round it to a multiple of {multiple}")

    @classmethod
    def fixed(cls, batch: int = 1, height: int = 1024, width: int = 1024,
              text_tokens: Range | None = None) -> "Geometry":
        """Static-shape fast path: one serving size, min = opt = max for batch, height and width (the
        text axis keeps its default range unless given: prompt lengths vary per request)."""
        return cls(Range(batch, batch, batch), Range(height, height, height), Range(width, width, width),
                   text_tokens=text_tokens or cls().text_tokens)

    @property
    def is_static(self) -> bool:
        """True when every base symbol has min == opt == max."""
        return all(r.min == r.max for r in (self.batch, self.height, self.width))

    def base_ranges(self) -> dict[str, Range]:
        """Base symbol -> range in its own units: {"batch", "height", "width", "text_tokens"}."""
        return {"batch": self.batch, "height": self.height, "width": self.width, "text_tokens": self.text_tokens}

    def for_component(self, component: str) -> "Geometry":
        """The geometry `component`'s profile is made from: the VAE decoder's batch is decode_batch."""
        if component in DECODE_COMPONENTS:
            return replace(self, batch=self.decode_batch)
        return self


DECODE_COMPONENTS = ("vae_decoder",)  # run once per image by the runtime, batch = Geometry.decode_batch


def parse_range(text: str) -> Range:
    """'1:2:4' -> Range(1, 2, 4); '2' -> Range(2, 2, 2). ProfileError saying the form otherwise."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ProfileError(f"'{text}' is not a range: give MIN:OPT:MAX (e.g. 512:1024:1536) or one value")
    return Range(*values)


# symbol -> (base symbol, divisor applied to the base): latent_height = height / 8
_SYMBOLS = {
    "batch": ("batch", 1), "B": ("batch", 1),
    "height": ("height", 1), "H": ("height", 1),
    "width": ("width", 1), "W": ("width", 1),
    "latent_height": ("height", LATENT_FACTOR), "latent_width": ("width", LATENT_FACTOR),
    TEXT_TOKENS_AXIS: (TEXT_TOKENS_AXIS, 1),
}
_EXPR = re.compile(r"^(?:(\d+)\s*\*?\s*)?([A-Za-z_]\w*)(?:\s*\*\s*(\d+))?(?:\s*//?\s*(\d+))?$")


@dataclass(frozen=True)
class DimExpr:
    """A parsed axis name: value = base * coef / div (must stay an integer)."""

    base: str
    coef: int
    div: int

    def value(self, base_value: int, name: str = "") -> int:
        """The axis size for one value of its base symbol; ProfileError if not an integer."""
        numerator = base_value * self.coef
        if numerator % self.div:
            raise ProfileError(f"axis '{name}' is {numerator}/{self.div}, not an integer, at "
                               f"{self.base}={base_value}; choose sizes divisible by it")
        return numerator // self.div

    @property
    def is_cfg_rows(self) -> bool:
        """A ``2B`` axis: uncond + cond rows with guidance, one row per image without (guidance <= 1)."""
        return self.base == "batch" and self.coef == 2 and self.div == 1

    def range(self, base: "Range", name: str = "") -> "Range":
        """The axis range for its base symbol's range. A ``2B`` axis over a batch range (min < max)
        starts at batch.min rows: guidance <= 1 runs no CFG pair (as diffusers does); a fixed batch
        keeps exactly 2·batch rows, so the static fast path stays static."""
        low = base.min if self.is_cfg_rows and base.min < base.max else self.value(base.min, name)
        return Range(low, self.value(base.opt, name), self.value(base.max, name))

    def base_value(self, axis_value: int) -> int | None:
        """Invert: the base symbol's value for one axis size (None if not exact)."""
        numerator = axis_value * self.div
        return numerator // self.coef if numerator % self.coef == 0 else None


def parse_dim(name: str) -> DimExpr:
    """Parse one dynamic axis name (see the module docstring) into a DimExpr.

    name: e.g. "2B", "2*batch", "latent_height/4", "8*latent_height". Raises ProfileError
    naming the known symbols when the name does not follow the convention.
    """
    match = _EXPR.match(name.strip())
    if not match or match.group(2) not in _SYMBOLS or (match.group(1) and match.group(3)):
        raise ProfileError(
            f"dynamic axis '{name}' does not follow the naming convention: use "
            f"[k*]symbol[/d] with symbol one of {sorted(_SYMBOLS)} (e.g. 'batch', '2B', "
            "'latent_height/2'); see engine/profiles.py")
    coef = int(match.group(1) or match.group(3) or 1)
    base, divisor = _SYMBOLS[match.group(2)]
    div = divisor * int(match.group(4) or 1)
    if coef == 0 or div == 0:
        raise ProfileError(f"dynamic axis '{name}' multiplies or divides by zero")
    return DimExpr(base, coef, div)


def dim_range(dim: int | str, geometry: Geometry) -> Range:
    """(min, opt, max) of one axis: a static int, or a named dynamic axis under `geometry`."""
    if isinstance(dim, int):
        if dim <= 0:
            raise ProfileError(f"static axis of size {dim}: name the dynamic axis instead")
        return Range(dim, dim, dim)
    if not dim:
        raise ProfileError("a dynamic axis has no name; name it per engine/profiles.py (e.g. 'batch')")
    expr = parse_dim(dim)
    return expr.range(geometry.base_ranges()[expr.base], dim)


def shape_range(dims: Sequence[int | str], geometry: Geometry) -> ShapeRange:
    """(min, opt, max) shape for one input's ONNX dims, e.g. ["2B", 4, "latent_height", "latent_width"]."""
    ranges = [dim_range(d, geometry) for d in dims]
    return ShapeRange(tuple(r.min for r in ranges), tuple(r.opt for r in ranges),
                      tuple(r.max for r in ranges))


def profile_for(inputs: Mapping[str, Sequence[int | str]], geometry: Geometry) -> Profile:
    """One optimisation profile for a component.

    inputs: input name -> ONNX dims (ints and axis names), as in the manifest's OnnxRecord.
    Returns input name -> ShapeRange. Errors name the input whose axis is badly named.
    """
    profile = {}
    for name, dims in inputs.items():
        try:
            profile[name] = shape_range(dims, geometry)
        except ProfileError as error:
            raise ProfileError(f"input '{name}' {list(dims)}: {error}") from None
    return profile


def solve_symbols(inputs: Mapping[str, Sequence[int | str]], profile: Profile) -> dict[str, Range]:
    """Recover base symbol ranges from input dims and a profile (to size outputs).

    Returns base symbol -> Range for every base symbol that some input axis determines.
    """
    solved: dict[str, Range] = {}
    for name, dims in inputs.items():
        if name not in profile:
            continue
        shapes = profile[name]
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                continue
            try:
                expr = parse_dim(dim)
            except ProfileError:
                continue
            values = [expr.base_value(s[axis]) for s in (shapes.min, shapes.opt, shapes.max)]
            if expr.is_cfg_rows and shapes.min[axis] < shapes.max[axis]:
                values[0] = shapes.min[axis]  # a 2B axis over a batch range starts at batch.min rows
            if None not in values and expr.base not in solved:
                solved[expr.base] = Range(*values)
    return solved


def output_range(dims: Sequence[int | str], bases: Mapping[str, Range]) -> ShapeRange | None:
    """(min, opt, max) shape of an output from solved base symbols; None if any axis is unknown."""
    ranges = []
    for dim in dims:
        if isinstance(dim, int):
            ranges.append(Range(dim, dim, dim))
            continue
        try:
            expr = parse_dim(dim)
        except ProfileError:
            return None
        if expr.base not in bases:
            return None
        try:
            ranges.append(expr.range(bases[expr.base], dim))
        except ProfileError:
            return None
    return ShapeRange(tuple(r.min for r in ranges), tuple(r.opt for r in ranges),
                      tuple(r.max for r in ranges))

