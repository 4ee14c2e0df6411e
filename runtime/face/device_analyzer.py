"""FaceAnalyzer on device tensors: the photo is uploaded once, every step but the 5-point fit runs
where it lives (`runtime.face.device`), the models are `runtime.sessions.Session`s (TensorRT,
ONNX Runtime, torch) fed and read as torch tensors.

    analyzer = DeviceFaceAnalyzer.from_sessions(open_session(build, "face_detector", backend),
                                                open_session(build, "arcface", backend), device="cuda")
    face = analyzer.analyze(rgb)             # Face: bbox, kps, det_score, embedding (host numpy)

Same results and errors as `FaceAnalyzer` (NoFaceError, FaceIndexError, ImageError), to within the
1-grey-level resize/warp rounding (tests/test_face_device.py has the measured differences).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.face.analyzer import largest_first, pick_face
from runtime.face.detect import Face
from runtime.face.device import (blob_tensor, letterbox_tensor, norm_crop_tensor, scrfd_faces, to_device_image,
                                 yunet_faces)
from runtime.images import ImageSource, load_image
from runtime.sessions import Session

YUNET_OUTPUTS = tuple(f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in (8, 16, 32))


def _check_image(image: torch.Tensor) -> None:
    if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[:2] == (1, 3)):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"device face models take a (1, 3, H, W) BGR tensor, got {got}: upload the photo with "
                         "DeviceFaceAnalyzer.upload (or runtime.face.device.to_device_image(...).flip(1))")


def _outputs_on(session: Session, feeds: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """session.run with the outputs moved to `device` (a no-op where the session already is)."""
    return {name: tensor.to(device) for name, tensor in session.run(feeds).items()}


class DeviceSCRFD:
    """SCRFDDetector on device tensors. session: the build's face_detector (or any SCRFD-with-kps
    ONNX in an OrtSession); det_size, thresholds: as SCRFDDetector."""

    def __init__(self, session: Session, det_size: tuple[int, int] = (640, 640), score_threshold: float = 0.5,
                 nms_threshold: float = 0.4):
        last_dims = sorted(info.shape[-1] if isinstance(info.shape[-1], int) else -1 for info in session.outputs)
        if last_dims != [1, 1, 1, 4, 4, 4, 10, 10, 10]:
            raise ValueError(f"{session.name} is not an SCRFD-with-keypoints model: expected 9 outputs (3 score, "
                             f"3 bbox, 3 kps with last dims 1/4/10), got last dims {last_dims}; use "
                             "scrfd_10g_bnkps.onnx from antelopev2")
        self.session, self.input_name = session, session.inputs[0].name
        self.det_size = tuple(det_size)
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    def detect(self, image: torch.Tensor) -> list[Face]:
        """Faces in a (1, 3, H, W) uint8 BGR tensor, in its pixels, highest score first."""
        _check_image(image)
        canvas, scale = letterbox_tensor(image, self.det_size, upscale=True)
        blob = blob_tensor(canvas, 127.5, 128.0, swap_rb=True)
        outputs = _outputs_on(self.session, {self.input_name: blob}, image.device)
        return scrfd_faces(outputs, self.det_size, scale, self.score_threshold, self.nms_threshold)


class DeviceYuNet:
    """YuNetDetector on device tensors. session: the build's YuNet face_detector (outputs cls_*, obj_*,
    bbox_*, kps_*); thresholds, top_k, upscale: as YuNetDetector (FaceDetectorYN's defaults)."""

    def __init__(self, session: Session, score_threshold: float = 0.9, nms_threshold: float = 0.3,
                 top_k: int = 5000, upscale: bool = False):
        missing = sorted(set(YUNET_OUTPUTS) - set(session.output_names))
        if missing:
            raise ValueError(f"{session.name} is not a YuNet 2023 model: outputs {missing} are missing (has "
                             f"{sorted(session.output_names)}); use OpenCV Zoo's face_detection_yunet_2023mar.onnx")
        self.session, self.input_name = session, session.inputs[0].name
        height, width = session.inputs[0].shape[2:4]
        fixed = isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
        self.input_size = (width, height) if fixed else (640, 640)
        self.score_threshold, self.nms_threshold, self.top_k = score_threshold, nms_threshold, top_k
        self.upscale = upscale

    def detect(self, image: torch.Tensor) -> list[Face]:
        """Faces in a (1, 3, H, W) uint8 BGR tensor, in its pixels, highest score first."""
        _check_image(image)
        canvas, scale = letterbox_tensor(image, self.input_size, upscale=self.upscale)
        outputs = _outputs_on(self.session, {self.input_name: canvas.float()}, image.device)  # BGR 0-255
        return yunet_faces(outputs, self.input_size, scale, self.score_threshold, self.nms_threshold, self.top_k)


class DeviceArcFace:
    """ArcFace on device tensors: crops aligned by norm_crop_tensor, normalised by blob_tensor.

    session: the build's arcface (`crops` (batch, 3, S, S) -> `embedding` (batch, D)) or any
    ArcFace-style recogniser; input_mean / input_std / swap_rb: as ArcFace (glintr100's defaults;
    MobileFaceNet: input_std=128.0). Batches are split to the session's largest batch (a fixed
    batch, or an engine's profile maximum).
    """

    def __init__(self, session: Session, input_mean: float = 127.5, input_std: float = 127.5,
                 swap_rb: bool = True):
        info = session.inputs[0]
        batch, _, height, width = info.shape
        if not (isinstance(height, int) and height == width):
            raise ValueError(f"{session.name}: expected a square fixed-size crop input [N, 3, S, S], got {info.shape}")
        self.session, self.input_name, self.output_name = session, info.name, session.outputs[0].name
        self.input_size = height
        self.max_batch = batch if isinstance(batch, int) and batch > 0 else (info.max[0] if info.max else None)
        self.input_mean, self.input_std, self.swap_rb = input_mean, input_std, swap_rb

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Raw embeddings (N, D) float32, on the crops' device, of aligned BGR crops (N, 3, S, S)."""
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"crops must be (N, 3, {self.input_size}, {self.input_size}) from norm_crop_tensor, "
                             f"got {tuple(crops.shape)}")
        blob = blob_tensor(crops, self.input_mean, self.input_std, self.swap_rb)
        chunks = blob.split(self.max_batch or len(blob))
        # clone: a TensorRT session reuses its output buffer on the next call with the same shapes
        embeddings = [self.session.run({self.input_name: chunk})[self.output_name].clone() for chunk in chunks]
        return torch.cat(embeddings).reshape(len(crops), -1).float().to(crops.device)

    def embed_faces(self, image: torch.Tensor, kps: Sequence[np.ndarray]) -> np.ndarray:
        """Raw embeddings (N, D) float32 on the host of the faces with landmarks kps (N × (5, 2))
        in a (1, 3, H, W) BGR tensor: one warp, one (chunked) recogniser run, one copy back."""
        _check_image(image)
        return self.embed(norm_crop_tensor(image, kps, self.input_size)).cpu().numpy()


class DeviceFaceAnalyzer:
    """Detector + recogniser on device tensors, with FaceAnalyzer's API, results and errors.

    detector: DeviceSCRFD or DeviceYuNet; recognizer: DeviceArcFace, or None for keypoints only.
    device: where photos are uploaded and processed (default: the detector session's device).
    """

    def __init__(self, detector: DeviceSCRFD | DeviceYuNet, recognizer: DeviceArcFace | None = None,
                 device: str | torch.device | None = None):
        self.detector, self.recognizer = detector, recognizer
        self.device = torch.device(device) if device is not None else detector.session.device

    @classmethod
    def from_sessions(cls, detector: Session, recognizer: Session | None = None,
                      device: str | torch.device | None = None, **arcface_options) -> "DeviceFaceAnalyzer":
        """Analyzer over a face_detector session (YuNet when it has cls_8.., else SCRFD) and an arcface
        session (None: keypoints only). arcface_options: input_mean / input_std / swap_rb of DeviceArcFace."""
        face_detector = DeviceYuNet(detector) if "cls_8" in detector.output_names else DeviceSCRFD(detector)
        arcface = None if recognizer is None else DeviceArcFace(recognizer, **arcface_options)
        return cls(face_detector, arcface, device)

    def upload(self, rgb: ImageSource) -> torch.Tensor:
        """A photo (anything `load_image` takes; ImageError as it raises) -> (1, 3, H, W) uint8 BGR on device."""
        return to_device_image(load_image(rgb), self.device).flip(1)

    def faces(self, rgb: ImageSource) -> list[Face]:
        """FaceAnalyzer.faces: all faces, largest box first, with raw embeddings. Raises NoFaceError."""
        image = self.upload(rgb)
        faces = largest_first(self.detector.detect(image), "photo")
        if self.recognizer is not None:
            for face, embedding in zip(faces, self.recognizer.embed_faces(image, [face.kps for face in faces])):
                face.embedding = embedding
        return faces

    def analyze(self, rgb: ImageSource, face_index: int | None = None) -> Face:
        """FaceAnalyzer.analyze: the largest face (or faces-by-area[face_index]) with bbox (4,), kps (5, 2)
        and raw embedding (D,), host numpy. Raises NoFaceError, FaceIndexError."""
        image = self.upload(rgb)
        face = pick_face(largest_first(self.detector.detect(image), "photo"), face_index, "photo")
        if self.recognizer is not None:
            face.embedding = self.recognizer.embed_faces(image, [face.kps])[0]
        return face

    def pose_kps(self, pose_rgb: ImageSource, face_index: int | None = None) -> np.ndarray:
        """FaceAnalyzer.pose_kps: keypoints (5, 2) float32 of a pose photo. Raises NoFaceError, FaceIndexError."""
        faces = largest_first(self.detector.detect(self.upload(pose_rgb)), "pose photo")
        return pick_face(faces, face_index, "pose photo").kps
