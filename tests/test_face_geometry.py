"""Face photos are analysed at their own aspect ratio and the reference's detection size, whatever
the output size; the keypoints are mapped to the output canvas (runtime.pipelines.face_conditioning)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from runtime.face import NoFaceError, draw_kps
from runtime.images import CanvasMap, ImageError, cover_map, instantid_size, model_size, resize_for_instantid
from runtime.pipelines import face_conditioning


@pytest.fixture(scope="module")
def instantid(tiny_build):
    from runtime.pipelines import InstantIDPipeline

    return InstantIDPipeline.from_build(tiny_build, "onnxruntime", threads=1)


class SeenSizes:
    """The build's real analyzer, recording the size of every photo it is given."""

    def __init__(self, analyzer):
        self.analyzer, self.seen = analyzer, []

    def analyze(self, rgb, face_index=None):
        self.seen.append(("analyze", rgb.shape))
        return self.analyzer.analyze(rgb, face_index=face_index)

    def pose_kps(self, rgb, face_index=None):
        self.seen.append(("pose_kps", rgb.shape))
        return self.analyzer.pose_kps(rgb, face_index)


def two_faces() -> np.ndarray:
    """A 2:1 photo (1024 x 512) of two equal faces: the astronaut twice, side by side."""
    return np.ascontiguousarray(np.hstack([data.astronaut(), data.astronaut()]))


def test_cover_map_numbers():
    photo, canvas = (1280, 640), (256, 256)
    assert cover_map(photo, canvas) == CanvasMap(0.4, 128.0, 0.0)          # centred: 512 x 256 cropped to 256
    assert cover_map(photo, canvas, focus=(320, 320)) == CanvasMap(0.4, 0.0, 0.0)      # left face: at the edge
    assert cover_map(photo, canvas, focus=(960, 320)) == CanvasMap(0.4, 256.0, 0.0)    # right face
    assert cover_map(photo, canvas, focus=(700, 320)) == CanvasMap(0.4, 152.0, 0.0)    # 700 * 0.4 - 128
    assert cover_map((1280, 1280), (128, 128), focus=(10, 10)) == CanvasMap(0.1, 0.0, 0.0)  # same aspect: resize
    np.testing.assert_allclose(CanvasMap(0.4, 152.0, 0.0).points(np.array([[700.0, 320.0]])), [[128.0, 128.0]])


def test_instantid_sizes_without_pixels():
    assert instantid_size(512, 512) == ((1280, 1280), (1280, 1280))     # infer.py sets the long side to 1280
    assert instantid_size(512, 256) == ((1280, 640), (1280, 640))
    assert instantid_size(1000, 700)[1] == (1280, 896)
    assert model_size(512, 512, 128) == (128, 128) and model_size(512, 256, 128) == (128, 64)
    assert resize_for_instantid(data.astronaut()).shape == (1280, 1280, 3)
    with pytest.raises(ImageError, match="too elongated.*crop it"):
        instantid_size(100_000, 1)  # refused from the header size, before any resize


def test_demo_photo_finds_the_face_without_a_size(instantid):
    """No width/height on the tiny build: the face is found (at the old 128 px photo it was not)."""
    from runtime.images import resize_for_model

    with pytest.raises(NoFaceError):  # what the photo looked like to the detector before
        instantid.face_analyzer.analyze(resize_for_model(data.astronaut(), 128))
    prepared = instantid.prepare(data.astronaut(), "a person", steps=1)
    assert (prepared.settings.width, prepared.settings.height) == (128, 128)  # the model's resolution
    control = prepared.control_image[0]
    assert control.shape == (3, 128, 128) and float(control.amax()) == 1.0  # the kps are drawn
    face, kps_image = face_conditioning(instantid.face_analyzer, data.astronaut(), resolution=128)
    reference = instantid.face_analyzer.analyze(resize_for_instantid(data.astronaut()))
    np.testing.assert_allclose(face.kps, reference.kps)
    assert np.array_equal(kps_image, draw_kps(128, 128, reference.kps * 0.1))  # 1280 -> 128


def test_two_equal_faces_in_a_2to1_photo_at_256(instantid):
    photo = two_faces()
    squashed = np.asarray(Image.fromarray(photo).resize((256, 256), Image.BILINEAR))
    with pytest.raises(NoFaceError):  # what the photo looked like to the detector before
        instantid.face_analyzer.analyze(squashed)
    seen = SeenSizes(instantid.face_analyzer)
    face, kps_image = face_conditioning(seen, photo, width=256, height=256, resolution=128)
    assert seen.seen == [("analyze", (640, 1280, 3))]  # 2:1 kept, at the reference's detection size
    faces = instantid.face_analyzer.faces(resize_for_instantid(photo))
    assert len(faces) == 2 and abs(faces[0].area / faces[1].area - 1) < 0.1
    mapping = cover_map((1280, 640), (256, 256), focus=tuple(face.kps.mean(axis=0)))
    assert mapping.scale == 0.4 and 0 <= mapping.offset_x <= 256
    kps = mapping.points(face.kps)
    assert (kps >= 0).all() and (kps < 256).all()  # the chosen face is inside the square, not squashed
    assert np.array_equal(kps_image, draw_kps(256, 256, kps))
    prepared = instantid.prepare(photo, "two people", steps=1, width=256, height=256)
    assert np.array_equal((prepared.control_image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                          kps_image)


def test_pose_photo_does_not_resize_the_identity_photo(instantid):
    """Over HTTP too: the identity photo reaches the detector at its own size, not the pose photo's."""
    from runtime.serve.inputs import Limits, resolve_request, validate

    def png(rgb) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "PNG")
        return buffer.getvalue()

    identity, pose = data.astronaut(), two_faces()
    request, images = validate("instantid", {"prompt": "a person", "image": png(identity), "pose_image": png(pose)})
    generation, key = resolve_request("instantid", request, images, Limits(), None, resolution=128)
    assert generation.image.shape == identity.shape and generation.pose_image.shape == pose.shape
    assert (generation.width, generation.height) == (128, 64)  # the pose photo's 2:1 at the model's resolution
    seen = SeenSizes(instantid.face_analyzer)
    face, kps_image = face_conditioning(seen, generation.image, generation.pose_image, generation.width,
                                        generation.height, 128)
    assert seen.seen == [("analyze", (1280, 1280, 3)), ("pose_kps", (640, 1280, 3))]
    assert kps_image.shape == (64, 128, 3)
    pose_kps = instantid.face_analyzer.pose_kps(resize_for_instantid(pose))
    assert np.array_equal(kps_image, draw_kps(128, 64, pose_kps * 0.1))
    np.testing.assert_allclose(face.embedding, instantid.face_analyzer.analyze(resize_for_instantid(identity)).embedding)


def test_kps_match_the_reference_for_an_sdxl_size_photo(instantid):
    """At SDXL's resolution the kps image is the reference's: infer.py resize, detect, draw at that size."""
    photo = np.ascontiguousarray(data.astronaut()[:, 64:448])  # 384 x 512, portrait 3:4
    reference_rgb = resize_for_instantid(photo)  # infer.py: 1024 x 1365 -> 960 x 1280, floored
    assert reference_rgb.shape == (1280, 960, 3)
    reference = instantid.face_analyzer.analyze(reference_rgb)
    expected = draw_kps(960, 1280, reference.kps)
    for size in ({}, {"width": 960, "height": 1280}):
        face, kps_image = face_conditioning(instantid.face_analyzer, photo, resolution=1024, **size)
        assert np.array_equal(kps_image, expected)
        np.testing.assert_allclose(face.embedding, reference.embedding)
    # a square output of the same photo: one scale (1024 / 960), cropped vertically around the face
    face, kps_image = face_conditioning(instantid.face_analyzer, photo, width=1024, height=1024, resolution=1024)
    scale = 1024 / 960
    offset_y = min(max(reference.kps[:, 1].mean() * scale - 512, 0), 1280 * scale - 1024)
    assert np.array_equal(kps_image, draw_kps(1024, 1024, (reference.kps * scale - (0, offset_y)).astype(np.float32)))
