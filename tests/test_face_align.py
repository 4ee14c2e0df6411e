"""ArcFace alignment against insightface's face_align (the oracle) and scikit-image: the runtime's
fit and torch warp, and the OpenCV warp of tests/face_reference.py."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from skimage.transform import SimilarityTransform

from face_reference import YuNetDetector, norm_crop
from runtime.face import estimate_norm
from runtime.face.align import arcface_template, umeyama_similarity
from runtime.face.image_ops import norm_crop_tensor, to_device_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage's estimate() inside insightface
T1 = Path(cv2.__file__).parents[1] / "insightface" / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="module")
def face_align():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from insightface.utils import face_align
    return face_align


@pytest.fixture(scope="module")
def photos(real_models) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, BGR image, kps) for astronaut's face and every face YuNet finds in t1.jpg."""
    detector = YuNetDetector(real_models / "yunet_s_640_640.onnx")
    astronaut = np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])
    t1 = cv2.imread(str(T1))
    found = [("astronaut", astronaut, f.kps) for f in detector.detect(astronaut)]
    found += [(f"t1-face{i}", t1, f.kps) for i, f in enumerate(detector.detect(t1))]
    assert len(found) == 5
    return found


def _skimage_params(src, dst) -> np.ndarray:
    transform = SimilarityTransform()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transform.estimate(src, dst)
    return transform.params


def test_umeyama_equals_skimage_in_float64():
    rng = np.random.default_rng(0)
    template = arcface_template(112).astype(np.float64)
    for trial in range(60):
        src = rng.normal(size=(5, 2)) * 40 + 200
        if trial % 3 == 1:
            src[:, 0] *= -1  # mirrored face: the best fit must stay a rotation
        if trial % 3 == 2:
            src[:, 1] = 0.5 * src[:, 0] + 3  # collinear points (rank-1 covariance)
        ours = umeyama_similarity(src, template)
        assert np.abs(ours - _skimage_params(src, template)).max() < 1e-9
        assert np.linalg.det(ours[:2, :2]) > 0


@pytest.mark.parametrize("size", [112, 128, 224, 256])
def test_estimate_norm_equals_insightface(face_align, photos, size):
    for _, _, kps in photos:
        # insightface feeds float32 to scikit-image, which then computes in float32: ~1e-5 apart.
        assert np.abs(estimate_norm(kps, size) - face_align.estimate_norm(kps, size)).max() < 1e-3
        template = arcface_template(size).astype(np.float64)
        assert np.abs(estimate_norm(kps, size) - _skimage_params(kps.astype(np.float64), template)[:2]).max() < 1e-9


def runtime_norm_crop(bgr: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    """The runtime's crop (torch warp on the CPU) as an (S, S, 3) uint8 array."""
    return norm_crop_tensor(to_device_image(bgr, "cpu"), [kps], size)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("path", ["runtime", "reference"])
@pytest.mark.parametrize("size", [112, 128])
def test_norm_crop_within_one_grey_level(face_align, photos, size, path):
    worst = 0
    crop = runtime_norm_crop if path == "runtime" else norm_crop
    for name, image, kps in photos:
        ours = crop(image, kps, size)
        reference = face_align.norm_crop(image, kps, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        difference = np.abs(ours.astype(int) - reference.astype(int))
        worst = max(worst, int(difference.max()))
        assert (difference > 0).mean() < 0.01, name  # measured: under 0.1 % of values differ
    assert worst <= 1


def test_aligned_landmarks_land_on_the_template(photos):
    _, _, kps = photos[0]  # astronaut, a frontal face
    matrix = estimate_norm(kps)
    mapped = kps @ matrix[:, :2].T + matrix[:, 2]
    error = np.linalg.norm(mapped - arcface_template(112), axis=1)
    assert error.max() < 6.0  # a similarity fit, not exact: measured 4.6 px (right mouth corner)
    # Least squares over similarities [[a, -b, tx], [b, a, ty]]: no nudge lowers the error.
    assert matrix[0, 0] == pytest.approx(matrix[1, 1]) and matrix[0, 1] == pytest.approx(-matrix[1, 0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b, tx, ty = rng.normal(scale=[1e-3, 1e-3, 1e-2, 1e-2])
        nudged = matrix + np.array([[a, -b, tx], [b, a, ty]])
        nudged_error = kps @ nudged[:, :2].T + nudged[:, 2] - arcface_template(112)
        assert (error**2).sum() <= (nudged_error**2).sum()


def test_bad_landmarks():
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        estimate_norm(np.zeros((68, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        estimate_norm(np.ones((5, 2)))
    with pytest.raises(ValueError, match="112"):
        estimate_norm(np.random.default_rng(0).normal(size=(5, 2)), 100)
