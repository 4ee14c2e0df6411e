"""Loading user photos safely and the InstantID input resize.

`load_image` turns a path, bytes, a PIL image or an array into one contract: an (H, W, 3)
uint8 RGB array, EXIF orientation applied. Everything that can go wrong with a user's file
raises `ImageError` (a ValueError) whose message says what to do about it.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 50_000_000
"""Default refusal limit (width × height): 50 MP, e.g. 8660 × 5773. Far above any useful
face photo (InstantID works at ~1.3 MP) and far below what exhausts memory when decoded."""
MAX_SIDE = 16384
"""Default refusal limit for either side (px): about WebP's own maximum (16,383), twice an 8K photo's long side."""
MAX_ASPECT_RATIO = 20.0
"""Default refusal limit for long side / short side: InstantID's resize keeps a side of 64 px up to
20:1 (1280 / 64), and every resize of a photo (CLIP's shortest-edge 224, InstantID's) allocates
in proportion to it, so a 100000 x 1 strip is refused before anything is scaled."""

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class ImageError(ValueError):
    """A photo could not be used; the message says why and what to do."""


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE,
               max_aspect: float = MAX_ASPECT_RATIO) -> np.ndarray:
    """Load a photo as an RGB array.

    source: a file path (str / PathLike), the encoded file bytes, a PIL image, or an
        ndarray that is already decoded: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, uint8.
    max_pixels: refuse images with more than this many pixels (width × height), checked
        from the header before the pixels are decoded (decompression-bomb guard). PIL's own
        hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS, ~179 MP) applies on top of it.
    max_side, max_aspect: refuse a side longer than max_side px, or long side / short side above
        max_aspect, checked at the same point (a 92-byte PNG can declare 100000 x 1 pixels).
    Returns: (H, W, 3) uint8 RGB, C-contiguous, EXIF orientation applied.
    Raises ImageError for a missing/empty/corrupt/truncated/non-image file, an image above
    max_pixels / max_side / max_aspect, or an array of the wrong dtype or shape.
    """
    bounds = (max_pixels, max_side, max_aspect)
    if isinstance(source, np.ndarray):
        return _from_array(source, bounds)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, bounds, "the image")
        return _from_pil(source, "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("the image bytes are empty (0 bytes): pass the full contents of a JPEG/PNG/WebP file")
        return _decode(io.BytesIO(data), "the image data", bounds)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image file not found: {path}: check the path (it is relative to {Path.cwd()})")
        if not path.is_file():
            raise ImageError(f"not a file: {path}: pass the path of a JPEG/PNG/WebP photo, not a folder")
        if path.stat().st_size == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}: the upload or copy failed, use the original file")
        with open(path, "rb") as stream:
            return _decode(stream, str(path), bounds)
    raise ImageError(
        f"cannot load an image from {type(source).__name__}: pass a file path, the file's bytes, "
        "a PIL.Image, or an (H, W, 3) uint8 RGB numpy array"
    )


def _check_pixels(width: int, height: int, bounds: tuple[int, int, float], what: str) -> None:
    """ImageError unless width x height is within bounds = (max_pixels, max_side, max_aspect)."""
    max_pixels, max_side, max_aspect = bounds
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is too large: {width}x{height} = {width * height:,} pixels, the limit is "
            f"{max_pixels:,}: downscale it first (a face photo needs no more than a few megapixels) "
            "or raise max_pixels if you trust the file"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{what} has no pixels ({width}x{height}): use a real photo")
    long, short = max(width, height), min(width, height)
    if long > max_aspect * short:
        raise ImageError(f"{what} is {width}x{height}, an aspect ratio of {long / short:,.0f}:1, the limit is "
                         f"{max_aspect:g}:1: crop it to the part that matters")
    if long > max_side:
        raise ImageError(f"{what} is {width}x{height}, a side over the limit of {max_side:,} px: downscale it first "
                         "(a face photo needs no more than a few megapixels)")


def _decode(stream: io.IOBase, what: str, bounds: tuple[int, int, float]) -> np.ndarray:
    """Open lazily (header only), check the size, then decode fully."""
    with warnings.catch_warnings():
        # PIL warns above its own limit; the explicit check below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError as error:
            # PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS), hit before the header check below.
            raise ImageError(
                f"{what} is too large: {error} Downscale it first (a face photo needs no more than a few megapixels)"
            ) from None
        except Image.UnidentifiedImageError:
            raise ImageError(
                f"{what} is not an image PIL can read (not JPEG/PNG/WebP/...): it may be a text, "
                "HTML or HEIC file, or corrupt; re-export the photo as JPEG or PNG"
            ) from None
        except OSError as error:
            raise ImageError(f"{what} could not be read ({error}): re-export the photo as JPEG or PNG") from None
        _check_pixels(image.width, image.height, bounds, what)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageError(
                f"{what} is corrupt or truncated ({error}): the download or upload was probably cut "
                "short; fetch the file again or re-export it as JPEG or PNG"
            ) from None
    return _from_pil(image, what)


def _from_pil(image: Image.Image, what: str) -> np.ndarray:
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            raise ImageError(
                f"{what} has {image.mode} pixels (16-bit or float): save it as an 8-bit RGB JPEG or PNG"
            )
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{what} could not be decoded ({error}): re-export the photo as JPEG or PNG") from None
    return np.ascontiguousarray(rgb)


def _from_array(array: np.ndarray, bounds: tuple[int, int, float]) -> np.ndarray:
    if array.dtype != np.uint8:
        hint = (
            "(array * 255).round().clip(0, 255).astype(np.uint8) for values in [0, 1]"
            if array.dtype.kind == "f"
            else "array.clip(0, 255).astype(np.uint8) after checking its range"
        )
        raise ImageError(f"image array has dtype {array.dtype}, expected uint8 0-255: convert it, e.g. {hint}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif not (array.ndim == 3 and array.shape[2] == 3):
        raise ImageError(
            f"image array has shape {array.shape}, expected (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey: "
            "for a CHW tensor use array.transpose(1, 2, 0); for a batch pass one image"
        )
    _check_pixels(array.shape[1], array.shape[0], bounds, "the image array")
    return np.ascontiguousarray(array)


INSTANTID_MIN_SIDE, INSTANTID_MAX_SIDE, INSTANTID_MULTIPLE = 1024, 1280, 64  # infer.py's resize_img


def instantid_size(width: int, height: int, min_side: int = INSTANTID_MIN_SIDE, max_side: int = INSTANTID_MAX_SIDE,
                   multiple: int = INSTANTID_MULTIPLE) -> tuple[tuple[int, int], tuple[int, int]]:
    """The sizes InstantID's `infer.py` resize (`resize_img`) gives a width x height photo, without
    touching pixels: ((W1, H1) after scaling, (W2, H2) = both floored to a multiple of `multiple`).

    As upstream: scaled so the short side is `min_side` (rounded), then the long side is scaled
    to exactly `max_side` (upstream sets it, it does not only cap it). Raises ImageError when a
    side would round to 0 (a photo too elongated to use), before anything is allocated.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"image {width}x{height} has no pixels: use a real photo")
    ratio = min_side / min(height, width)
    width_1, height_1 = round(ratio * width), round(ratio * height)
    ratio = max_side / max(height_1, width_1)
    first = (round(ratio * width_1), round(ratio * height_1))
    final = (first[0] // multiple * multiple, first[1] // multiple * multiple)
    if min(final) == 0:
        raise ImageError(f"image {width}x{height} is too elongated to resize for InstantID (aspect "
                         f"{max(width, height) / min(width, height):.0f}:1; at most "
                         f"{max_side // multiple}:1 keeps a side of {multiple} px): crop it")
    return first, final


def resize_for_instantid(
    rgb: np.ndarray, min_side: int = INSTANTID_MIN_SIDE, max_side: int = INSTANTID_MAX_SIDE,
    multiple: int = INSTANTID_MULTIPLE
) -> np.ndarray:
    """InstantID `infer.py` input resize (`resize_img`), reproduced exactly.

    rgb: (H, W, 3) uint8. Sizes as `instantid_size`; the image is bilinearly resized (PIL) to the
    first size, then again to the floored one (the reference squashes by that last step, < 5 %).
    Returns: (H', W', 3) uint8, H' and W' multiples of `multiple`. At the defaults (SDXL) this is
    the photo the reference detects faces on, and its size is the reference's output size.
    """
    first, final = instantid_size(rgb.shape[1], rgb.shape[0], min_side, max_side, multiple)
    image = Image.fromarray(rgb).resize(first, Image.BILINEAR).resize(final, Image.BILINEAR)
    return np.asarray(image)


def resize_for_model(rgb: np.ndarray, resolution: int = 1024) -> np.ndarray:
    """InstantID's resize (`resize_for_instantid`) scaled to a model's resolution: short side
    `resolution`, long side 1.25x; for SDXL (1024) exactly infer.py's 1024 / 1280."""
    return resize_for_instantid(rgb, min_side=resolution, max_side=resolution * 5 // 4)


def model_size(width: int, height: int, resolution: int = 1024) -> tuple[int, int]:
    """(W, H) that `resize_for_model` gives a width x height photo: InstantID's default output size
    at a model's resolution (SDXL: the reference's). ImageError for a photo too elongated."""
    return instantid_size(width, height, resolution, resolution * 5 // 4)[1]


@dataclass(frozen=True)
class CanvasMap:
    """Photo pixels -> output canvas pixels: canvas = photo * scale - (offset_x, offset_y).

    One scale for both axes (no squashing); the offsets crop what the canvas does not show.
    """

    scale: float
    offset_x: float
    offset_y: float

    def points(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) x, y in photo pixels -> (N, 2) float32 in canvas pixels."""
        return (np.asarray(points, np.float64) * self.scale - (self.offset_x, self.offset_y)).astype(np.float32)


def cover_map(photo_size: tuple[int, int], canvas_size: tuple[int, int],
              focus: tuple[float, float] | None = None) -> CanvasMap:
    """How a photo (width, height) covers a canvas (width, height): scaled by one factor until it
    fills the canvas, then cropped to it — around `focus` (x, y in photo pixels, e.g. the face's
    centre), as far as the photo allows, else centred. Equal aspect ratios give a plain resize.
    """
    (photo_w, photo_h), (canvas_w, canvas_h) = photo_size, canvas_size
    scale = max(canvas_w / photo_w, canvas_h / photo_h)

    def offset(photo: float, canvas: float, at: float | None) -> float:
        spare = photo * scale - canvas
        wanted = spare / 2 if at is None else at * scale - canvas / 2
        return float(min(max(wanted, 0.0), spare))

    fx, fy = (None, None) if focus is None else focus
    return CanvasMap(scale, offset(photo_w, canvas_w, fx), offset(photo_h, canvas_h, fy))
