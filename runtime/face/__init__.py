"""Face analysis for InstantID, one path on torch tensors (CPU or GPU): detection (SCRFD / YuNet),
ArcFace alignment and embedding (`analyzer`, `detect`, `image_ops`, `align`), where the models come
from (`models`), and the keypoint control image (`draw`). The numpy/OpenCV path it is checked
against lives in tests/face_reference.py."""
from runtime.face.align import estimate_norm
from runtime.face.analyzer import ArcFace, FaceAnalyzer, FaceIndexError, NoFaceError
from runtime.face.detect import Face, SCRFDDetector, YuNetDetector
from runtime.face.draw import draw_kps
from runtime.face.models import packaged_yunet

__all__ = [
    "ArcFace",
    "Face",
    "FaceAnalyzer",
    "FaceIndexError",
    "NoFaceError",
    "SCRFDDetector",
    "YuNetDetector",
    "draw_kps",
    "estimate_norm",
    "packaged_yunet",
]
