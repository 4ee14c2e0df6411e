"""FaceAnalyzer and ArcFace (the runtime's torch face path, on the CPU): the real MobileFaceNet tells
people apart through our alignment, the antelopev2-style folder loads, faces are picked as InstantID
picks them, errors are clear."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from export.tiny_face import write_tiny_face_models
from runtime.face import ArcFace, FaceAnalyzer, FaceIndexError, NoFaceError, YuNetDetector
from runtime.face.image_ops import norm_crop_tensor, to_device_image
from runtime.images import ImageError

T1 = Path(cv2.__file__).parents[1] / "insightface" / "data" / "images" / "t1.jpg"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def bgr_tensor(rgb: np.ndarray):
    """(H, W, 3) RGB array -> (1, 3, H, W) uint8 BGR CPU tensor, as FaceAnalyzer.upload makes it."""
    return to_device_image(np.ascontiguousarray(rgb[:, :, ::-1]), "cpu")


def aligned_crop(rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The runtime's ArcFace crop (112, 112, 3) uint8 BGR of a face in an RGB photo."""
    return norm_crop_tensor(bgr_tensor(rgb), [kps])[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def tiny_face(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("antelopev2_tiny")
    write_tiny_face_models(folder)
    return folder


@pytest.fixture(scope="module")
def real_analyzer(real_models) -> FaceAnalyzer:
    """Real YuNet + real MobileFaceNet ((x - 127.5) / 128, RGB, 128-d)."""
    recognizer = ArcFace(real_models / "mobilefacenet_128d.onnx", input_std=128.0)
    return FaceAnalyzer(YuNetDetector(real_models / "yunet_s_640_640.onnx"), recognizer)


def rotated_brightened(rgb: np.ndarray, degrees: float = 10.0, brighten: int = 30) -> np.ndarray:
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.convertScaleAbs(cv2.warpAffine(rgb, matrix, (width, height)), alpha=1.0, beta=brighten)


def test_mobilefacenet_same_person_vs_other_person(real_analyzer):
    astronaut = skimage.data.astronaut()
    reference = real_analyzer.analyze(astronaut)
    assert reference.embedding.shape == (128,) and reference.embedding.dtype == np.float32
    same = real_analyzer.analyze(rotated_brightened(astronaut))
    assert cosine(reference.embedding, same.embedding) > 0.85  # measured 0.950 (REFERENCE.md: ≈ 0.94)
    grey = np.stack([cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)] * 3, axis=-1)
    assert cosine(reference.embedding, real_analyzer.analyze(grey).embedding) > 0.9  # measured 0.955 (REFERENCE.md: ≈ 0.96)
    # camera() (greyscale cameraman, 512 x 512 like astronaut) has no face YuNet accepts at its
    # 0.9 threshold, so it is aligned with astronaut's kps: same crop window, another person.
    camera = np.stack([skimage.data.camera()] * 3, axis=-1)
    with pytest.raises(NoFaceError):
        real_analyzer.analyze(camera)
    other = real_analyzer.recognizer.embed_faces(bgr_tensor(camera), [reference.kps])[0]
    assert cosine(reference.embedding, other) < 0.3  # measured -0.143


def test_mobilefacenet_embedding_is_raw_and_matches_direct_onnx(real_models, real_analyzer):
    import onnxruntime as ort

    astronaut = skimage.data.astronaut()
    face = real_analyzer.analyze(astronaut)
    crop_bgr = aligned_crop(astronaut, face.kps)
    blob = ((crop_bgr[:, :, ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(real_models / "mobilefacenet_128d.onnx"), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"input0": blob})[0][0]
    assert np.abs(face.embedding - direct).max() < 1e-4
    assert abs(float(np.linalg.norm(face.embedding)) - 1.0) > 0.1  # not L2-normalised
    assert np.allclose(np.linalg.norm(face.normed_embedding), 1.0)


def test_no_face_errors(real_analyzer):
    with pytest.raises(NoFaceError, match="no face found in the photo: use a photo with one clearly visible face"):
        real_analyzer.analyze(skimage.data.chelsea())
    with pytest.raises(NoFaceError, match="no face found in the pose photo"):
        real_analyzer.pose_kps(skimage.data.coffee())


def test_bad_inputs_reach_the_user_as_image_errors(real_analyzer, tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        real_analyzer.analyze(b"GIF89a but not really")
    text = tmp_path / "face.txt"
    text.write_text("not a photo")
    with pytest.raises(ImageError, match="not an image"):
        real_analyzer.analyze(text)
    with pytest.raises(ImageError, match="empty"):
        real_analyzer.analyze(b"")
    with pytest.raises(ImageError, match="too large"):
        real_analyzer.analyze(np.broadcast_to(np.zeros(1, np.uint8), (7100, 7100, 3)))  # 50.4 MP, no memory


def test_faces_largest_first_and_face_index(real_analyzer):
    rgb = cv2.imread(str(T1))[:, :, ::-1]
    faces = real_analyzer.faces(rgb)
    assert len(faces) == 4
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)
    assert all(face.embedding.shape == (128,) for face in faces)
    assert np.array_equal(real_analyzer.analyze(rgb).bbox, faces[0].bbox)
    second = real_analyzer.analyze(rgb, face_index=1)
    assert np.array_equal(second.bbox, faces[1].bbox)
    assert np.abs(second.embedding - faces[1].embedding).max() < 1e-5
    with pytest.raises(FaceIndexError, match=r"face_index 4 is out of range: 4 face\(s\) found in the photo"):
        real_analyzer.analyze(rgb, face_index=4)


def test_pose_kps_from_a_second_photo(real_analyzer):
    astronaut = skimage.data.astronaut()
    identity = real_analyzer.analyze(astronaut)
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    kps = real_analyzer.pose_kps(mirrored)
    assert kps.shape == (5, 2) and kps.dtype == np.float32
    # Mirroring swaps sides; the layout stays image-left first, so point 0 of the mirror is the
    # mirror of point 1 of the original (and 3 <-> 4).
    expected = identity.kps[[1, 0, 2, 4, 3]].copy()
    expected[:, 0] = astronaut.shape[1] - expected[:, 0]
    assert kps[0, 0] < kps[2, 0] < kps[1, 0]
    assert np.abs(kps[:2] - expected[:2]).max() < 1.5  # eyes: measured 0.86 px
    assert np.abs(kps - expected).max() < 8.0  # a 3/4 face: nose and mouth shift, measured 6.1 px


def test_tiny_antelopev2_folder_with_scrfd(tiny_face):
    analyzer = FaceAnalyzer.from_folder(tiny_face)
    faces = analyzer.faces(skimage.data.astronaut())  # random SCRFD: 20 "faces", all noise
    assert len(faces) == 20
    assert all(face.embedding.shape == (512,) for face in faces)
    with pytest.raises(FaceIndexError, match=r"20 face\(s\) found"):
        analyzer.analyze(skimage.data.astronaut(), face_index=20)


def test_tiny_folder_with_packaged_yunet_matches_insightface_arcface(tiny_face):
    from insightface.model_zoo import get_model

    analyzer = FaceAnalyzer.from_folder(tiny_face, detector="yunet")
    astronaut = skimage.data.astronaut()
    face = analyzer.analyze(astronaut)
    assert np.abs(face.bbox - [178.0, 62.6, 268.4, 176.4]).max() < 1.0  # the int8 YuNet's box
    insightface_arcface = get_model(str(tiny_face / "glintr100.onnx"), providers=["CPUExecutionProvider"])
    expected = insightface_arcface.get_feat(aligned_crop(astronaut, face.kps))[0]  # its own normalisation
    assert face.embedding.shape == (512,)
    assert np.abs(face.embedding - expected).max() < 1e-5
    crops = norm_crop_tensor(bgr_tensor(astronaut), [face.kps] * 3)
    assert analyzer.recognizer.embed(crops).shape == (3, 512)  # dynamic batch: one run


def test_from_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scrfd_10g_bnkps.onnx not found.*detector='yunet'"):
        FaceAnalyzer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="glintr100.onnx not found"):
        FaceAnalyzer.from_folder(tmp_path, detector="yunet")
    with pytest.raises(ValueError, match="'scrfd' or 'yunet'"):
        FaceAnalyzer.from_folder(tmp_path, detector="retinaface")


def test_analyze_accepts_encoded_photos(real_analyzer):
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "PNG")
    from_bytes = real_analyzer.analyze(buffer.getvalue())
    from_array = real_analyzer.analyze(skimage.data.astronaut())
    assert np.array_equal(from_bytes.kps, from_array.kps)
