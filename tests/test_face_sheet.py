"""The demo's contact sheet: four labelled panels, the face's box and landmarks drawn where the
detector found them, the crop ArcFace embeds, the control image and the output unchanged."""
from __future__ import annotations

import numpy as np
import skimage.data
from PIL import Image

from runtime.face import FaceAnalyzer, YuNetDetector, draw_kps, packaged_yunet
from runtime.face.sheet import (BOX_COLOUR, CAPTION_HEIGHT, GAP, KPS_COLOURS, PANEL_HEIGHT, TITLES, annotate_face,
                                arcface_crop, contact_sheet, panel_boxes)


def astronaut_face():
    photo = skimage.data.astronaut()  # (512, 512, 3) uint8 RGB, one face
    face = FaceAnalyzer(YuNetDetector(packaged_yunet())).analyze(photo)
    return photo, face


def test_annotation_marks_the_detected_box_and_points():
    photo, face = astronaut_face()
    marked = annotate_face(photo, face)
    assert marked.shape == photo.shape and not np.shares_memory(marked, photo)
    x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
    assert tuple(marked[y1, (x1 + x2) // 2]) == BOX_COLOUR and tuple(marked[y2, (x1 + x2) // 2]) == BOX_COLOUR
    for (x, y), colour in zip(face.kps, KPS_COLOURS):
        assert tuple(marked[int(round(y)), int(round(x))]) == colour
    changed = np.any(marked != photo, axis=2)
    assert changed.mean() < 0.05  # the rest of the photo is left as it was


def test_crop_is_the_aligned_face():
    photo, face = astronaut_face()
    crop = arcface_crop(photo, face.kps)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # ArcFace's template puts the eyes at y ~ 51.6 and the mouth at y ~ 92: skin tones, not background
    assert crop.std() > 20 and crop[40:100, 30:82].mean() > 60


def test_sheet_has_four_labelled_panels_in_order():
    photo, face = astronaut_face()
    kps_image = draw_kps(256, 256, face.kps / 2)
    generated = Image.fromarray(np.full((256, 256, 3), (10, 200, 30), np.uint8))
    sheet = contact_sheet(photo, face, kps_image, generated)
    widths = [PANEL_HEIGHT] * 4  # every input here is square
    assert sheet.size == (4 * PANEL_HEIGHT + 5 * GAP, PANEL_HEIGHT + CAPTION_HEIGHT + 2 * GAP)
    pixels = np.asarray(sheet)
    boxes = panel_boxes(widths)
    photo_panel, kps_panel, crop_panel, out_panel = (pixels[t:b, l:r] for l, t, r, b in boxes)
    assert np.array_equal(kps_panel, np.asarray(Image.fromarray(kps_image)))  # same size: copied as is
    assert np.all(out_panel == (10, 200, 30))
    assert np.abs(photo_panel.astype(int) - np.asarray(Image.fromarray(photo).resize((256, 256), Image.LANCZOS),
                                                       int)).mean() < 3  # photo + thin overlay
    crop = Image.fromarray(arcface_crop(photo, face.kps)).resize((256, 256), Image.NEAREST)
    assert np.array_equal(crop_panel, np.asarray(crop))  # nearest: the 112 px crop's own pixels
    # a caption under each panel (dark text on the white strip), none between them
    for left, _, right, bottom in boxes:
        strip = pixels[bottom + 2:bottom + CAPTION_HEIGHT, left:right]
        assert (strip < 100).any()
    assert len(TITLES) == 4
