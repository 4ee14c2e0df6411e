"""draw_kps: pixel-identical to InstantID's control image, restated here plainly."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from runtime.face import draw_kps

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def reference_draw_kps(width: int, height: int, kps: np.ndarray) -> np.ndarray:
    """InstantID's draw_kps as written upstream (PIL image in, here the size), returning RGB uint8."""
    stickwidth = 4
    limb_seq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    out_img = np.zeros([height, width, 3])
    for i in range(len(limb_seq)):
        index = limb_seq[i]
        color = COLORS[index[0]]
        x = kps[index][:, 0]
        y = kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        out_img = cv2.fillConvexPoly(out_img.copy(), polygon, color)
    out_img = (out_img * 0.6).astype(np.uint8)
    for idx_kp, kp in enumerate(kps):
        x, y = kp
        out_img = cv2.circle(out_img.copy(), (int(x), int(y)), 10, COLORS[idx_kp], -1)
    return out_img.astype(np.uint8)


ASTRONAUT_KPS = np.array([(200.12, 101.82), (247.13, 102.62), (220.37, 124.54), (198.61, 142.77), (239.67, 143.64)], np.float32)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_astronaut_kps_pixel_exact(scale):
    kps = ASTRONAUT_KPS * np.float32(scale)
    size = int(512 * scale) // 64 * 64
    ours = draw_kps(size, size, kps)
    reference = reference_draw_kps(size, size, kps)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, reference)
    # Dots are full colour, limbs dimmed to 0.6: 255 * 0.6 -> 153.
    x, y = (int(v) for v in kps[0])
    assert tuple(ours[y, x]) == (255, 0, 0)
    assert tuple(ours[int(kps[2, 1]), int(kps[2, 0])]) == (0, 0, 255)
    assert 153 in np.unique(ours)


def test_random_kps_pixel_exact_including_off_canvas():
    rng = np.random.default_rng(0)
    for trial in range(40):
        width, height = int(rng.integers(64, 400)), int(rng.integers(64, 400))
        kps = (rng.uniform(-0.2, 1.2, size=(5, 2)) * [width, height]).astype(np.float32 if trial % 2 else np.float64)
        assert np.array_equal(draw_kps(width, height, kps), reference_draw_kps(width, height, kps)), trial


def test_bad_kps():
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        draw_kps(64, 64, np.zeros((106, 2)))
