"""A labelled contact sheet of one InstantID generation: what the engine saw and what it made.

Four panels side by side, each scaled to the same height and captioned:
1. the face photo (at InstantID's detection size) with the detected box and its five landmarks,
2. the keypoint control image the IdentityNet ControlNet reads,
3. the aligned 112 x 112 ArcFace crop the identity embedding comes from,
4. the generated image.
It shows at a glance whether the face was found where a person sees it, whether the pose drawn
for the ControlNet matches it, and which crop set the identity.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.face.detect import Face
from runtime.face.image_ops import norm_crop_tensor, to_device_image

PANEL_HEIGHT = 256
CAPTION_HEIGHT = 22
GAP = 8
BACKGROUND = (255, 255, 255)
CAPTION_COLOUR = (20, 20, 20)
BOX_COLOUR = (0, 220, 0)
# eyes, nose, mouth corners: the colours InstantID's draw_kps gives the five points
KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
TITLES = ("photo: box + 5 landmarks", "control image (keypoints)", "ArcFace crop 112x112", "generated")


def annotate_face(photo: np.ndarray, face: Face) -> np.ndarray:
    """(H, W, 3) uint8 RGB copy of `photo` with `face`'s box and five landmarks drawn on it."""
    out = np.ascontiguousarray(photo, dtype=np.uint8).copy()
    thickness = max(1, round(max(out.shape[:2]) / 300))
    x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
    cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
    for (x, y), colour in zip(face.kps, KPS_COLOURS):
        cv2.circle(out, (int(round(x)), int(round(y))), 2 * thickness + 1, colour, -1)
    return out


def arcface_crop(photo: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """(size, size, 3) uint8 RGB: the crop ArcFace embeds, by the runtime's own warp of `photo`
    (H, W, 3) uint8 RGB aligned on landmarks `kps` (5, 2)."""
    crop = norm_crop_tensor(to_device_image(np.asarray(photo, dtype=np.uint8), "cpu"), [kps], size)
    return crop[0].permute(1, 2, 0).numpy()


def _panel(image: np.ndarray | Image.Image, height: int) -> Image.Image:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    picture = picture.convert("RGB")
    width = max(1, round(picture.width * height / picture.height))
    # nearest keeps the 112 px crop's pixels visible instead of smoothing them away
    resample = Image.NEAREST if picture.height < height else Image.LANCZOS
    return picture.resize((width, height), resample)


def contact_sheet(photo: np.ndarray, face: Face, kps_image: np.ndarray, generated: Image.Image | np.ndarray,
                  panel_height: int = PANEL_HEIGHT) -> Image.Image:
    """The four-panel sheet (see the module docstring) as one RGB image.

    photo: (H, W, 3) uint8 RGB, the image `face` was detected on (its pixels are `face`'s frame).
    face: the detected face (bbox, kps). kps_image: (h, w, 3) uint8, the ControlNet's input.
    generated: the output image. Returns a PIL image `panel_height + CAPTION_HEIGHT` tall.
    """
    panels = [_panel(annotate_face(photo, face), panel_height), _panel(kps_image, panel_height),
              _panel(arcface_crop(photo, face.kps), panel_height), _panel(generated, panel_height)]
    width = sum(p.width for p in panels) + GAP * (len(panels) + 1)
    sheet = Image.new("RGB", (width, panel_height + CAPTION_HEIGHT + 2 * GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x = GAP
    for panel, title in zip(panels, TITLES):
        sheet.paste(panel, (x, GAP))
        draw.text((x, GAP + panel_height + 4), title, fill=CAPTION_COLOUR, font=font)
        x += panel.width + GAP
    return sheet


def panel_boxes(panel_widths: list[int], panel_height: int = PANEL_HEIGHT) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each panel on a sheet whose panels have `panel_widths`."""
    boxes, x = [], GAP
    for width in panel_widths:
        boxes.append((x, GAP, x + width, GAP + panel_height))
        x += width + GAP
    return boxes
