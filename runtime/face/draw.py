"""InstantID's control image: the 5 face keypoints drawn as coloured limbs and dots."""
from __future__ import annotations

import math

import cv2
import numpy as np

KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
"""RGB colour per keypoint: image-left eye, image-right eye, nose, left mouth, right mouth."""

LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
"""Every non-nose point joined to the nose; a limb takes its first point's colour."""

LIMB_HALF_WIDTH = 4
DOT_RADIUS = 10
LIMB_DIM = 0.6


def draw_kps(width: int, height: int, kps: np.ndarray) -> np.ndarray:
    """The InstantID ControlNet image for keypoints `kps` (5, 2) on a width × height canvas.

    Same pixels as InstantID's `draw_kps`: on a float canvas each limb is a filled ellipse
    polygon (cv2.ellipse2Poly, centre and axes int-truncated, angle in whole degrees, 1° steps),
    the canvas is scaled by 0.6 and truncated to uint8, then each point gets a filled radius-10
    dot. Returns (height, width, 3) uint8 RGB (the ControlNet reads it as RGB / 255).
    """
    kps = np.asarray(kps)
    if not np.issubdtype(kps.dtype, np.floating):
        kps = kps.astype(np.float64)
    # Arithmetic stays in kps' dtype (float32 from the detectors), as upstream, so the
    # int-truncated centres and axes land on the same pixels.
    if kps.shape != (5, 2):
        raise ValueError(f"kps must have shape (5, 2) (eyes, nose, mouth corners), got {kps.shape}")
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for start, end in LIMBS:
        (x0, y0), (x1, y1) = kps[start], kps[end]
        half_length = ((x0 - x1) ** 2 + (y0 - y1) ** 2) ** 0.5 / 2
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(half_length), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[start])
    image = (canvas * LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(kps, KPS_COLORS):
        cv2.circle(image, (int(x), int(y)), DOT_RADIUS, color, -1)
    return image
