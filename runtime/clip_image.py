"""CLIP image preprocessing for the image encoder, equal to transformers' CLIPImageProcessor defaults.

Shortest edge to 224 (PIL bicubic), centre crop 224, x/255, normalise with CLIP's mean/std, NCHW.
The resize is the processor's (the whole image, then the crop), so it allocates (224 x aspect) x 224
pixels: an image more elongated than `max_aspect` is refused before anything is allocated.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from runtime.images import MAX_ASPECT_RATIO, ImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_pixel_values(rgb: np.ndarray, size: int = 224, max_aspect: float = MAX_ASPECT_RATIO) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> pixel values (1, 3, size, size) float32.

    The resized image is at most (size x max_aspect) x size pixels. Raises ImageError for an empty
    image or one whose long side / short side exceeds max_aspect (default 20:1, as `load_image`).
    """
    height, width = rgb.shape[:2]
    short, long = (height, width) if height <= width else (width, height)
    if short == 0:
        raise ImageError(f"the image has no pixels ({width}x{height}): use a real image")
    if long > max_aspect * short:
        raise ImageError(f"the image is {width}x{height}, an aspect ratio of {long / short:,.0f}:1, the limit is "
                         f"{max_aspect:g}:1 (CLIP sees only its centre square): crop it to the part that matters")
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32)
    pixels = (crop * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)
