"""runtime.images: loading user photos (every failure is an ImageError that says what to do)
and the InstantID input resize."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from runtime.images import ImageError, load_image, resize_for_instantid


def _encode(rgb: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width × height pixels but carries one tiny compressed row."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_sources_agree():
    rgb = skimage.data.astronaut()
    png = _encode(rgb, "PNG")
    assert np.array_equal(load_image(png), rgb)
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    assert np.array_equal(load_image(rgb), rgb)
    grey = skimage.data.camera()
    assert np.array_equal(load_image(grey), np.stack([grey] * 3, axis=-1))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(load_image(rgba), rgb)


def test_path_and_exif_orientation(tmp_path):
    rgb = skimage.data.chelsea()  # 300 x 451
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.png"
    path.write_bytes(_encode(rgb, "PNG", exif=exif))
    loaded = load_image(path)
    assert loaded.shape == (451, 300, 3)
    assert np.array_equal(loaded, np.rot90(rgb, k=-1))
    assert np.array_equal(load_image(str(path)), loaded)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing.jpg", "image file not found"),
        (lambda tmp: _write(tmp / "empty.jpg", b""), r"empty \(0 bytes\)"),
        (lambda tmp: _write(tmp / "notes.txt", b"this is a text file, not a photo\n"), "is not an image"),
        (lambda tmp: _write(tmp / "cut.jpg", _encode(skimage.data.astronaut(), "JPEG")[:20000]), "corrupt or truncated"),
        (lambda tmp: tmp, "not a file"),
    ],
    ids=["missing", "zero-bytes", "text-file", "truncated-jpeg", "folder"],
)
def test_bad_files(tmp_path, make, message):
    with pytest.raises(ImageError, match=message) as error:
        load_image(make(tmp_path))
    assert ":" in str(error.value)  # every message says what to do after the colon


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_bad_bytes():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="re-export the photo as JPEG or PNG"):
        load_image(b"\xff\xd8\xff\xe0 garbage that starts like a JPEG")
    jpeg = _encode(skimage.data.astronaut(), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        load_image(jpeg[: len(jpeg) // 2])


def test_huge_images_refused_before_decoding():
    bomb = _png_header_only(10_000, 6_000)  # 60 MP claimed in a ~100-byte file
    assert len(bomb) < 200
    with pytest.raises(ImageError, match=r"too large: 10000x6000 = 60,000,000 pixels, the limit is 50,000,000"):
        load_image(bomb)
    with pytest.raises(ImageError, match="too large"):  # beyond PIL's own hard limit
        load_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match="raise max_pixels"):
        load_image(skimage.data.astronaut(), max_pixels=512 * 511)


def test_bad_arrays():
    with pytest.raises(ImageError, match=r"dtype float64, expected uint8.*\* 255"):
        load_image(np.zeros((8, 8, 3)))
    with pytest.raises(ImageError, match=r"dtype uint16"):
        load_image(np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(ImageError, match=r"shape \(3, 8, 8\).*transpose"):
        load_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ImageError, match="no pixels"):
        load_image(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(ImageError, match="cannot load an image from int"):
        load_image(3)


def _upstream_resize_img(image: Image.Image, max_side=1280, min_side=1024, base=64) -> Image.Image:
    """InstantID infer.py's resize_img (size=None, no padding), restated."""
    w, h = image.size
    ratio = min_side / min(h, w)
    w, h = round(ratio * w), round(ratio * h)
    ratio = max_side / max(h, w)
    image = image.resize([round(ratio * w), round(ratio * h)], Image.BILINEAR)
    new_w, new_h = (round(ratio * w) // base) * base, (round(ratio * h) // base) * base
    return image.resize([new_w, new_h], Image.BILINEAR)


@pytest.mark.parametrize("name, size", [("astronaut", (1280, 1280)), ("chelsea", (1280, 832)), ("coffee", (1280, 832))])
def test_resize_for_instantid_matches_upstream(name, size):
    rgb = getattr(skimage.data, name)()
    resized = resize_for_instantid(rgb)
    assert resized.shape == (size[1], size[0], 3)
    assert np.array_equal(resized, np.asarray(_upstream_resize_img(Image.fromarray(rgb))))
    portrait = np.ascontiguousarray(rgb.transpose(1, 0, 2))
    assert resize_for_instantid(portrait).shape == (size[0], size[1], 3)
    small = resize_for_instantid(rgb, min_side=512, max_side=640, multiple=32)
    assert np.array_equal(small, np.asarray(_upstream_resize_img(Image.fromarray(rgb), 640, 512, 32)))
    assert small.shape[1] == 640 and small.shape[0] % 32 == 0


def test_resize_for_model_scales_instantids_resize_to_the_models_resolution():
    from runtime.images import resize_for_model

    rgb = skimage.data.chelsea()  # 451 x 300
    assert np.array_equal(resize_for_model(rgb, 1024), resize_for_instantid(rgb))  # SDXL: infer.py exactly
    assert resize_for_model(rgb, 128).shape == (64, 128, 3)  # tiny: 160 x 106, floored to multiples of 64 px
    assert resize_for_model(rgb, 512).shape == (384, 640, 3)
