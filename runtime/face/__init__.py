"""Face analysis for InstantID: detection (SCRFD / YuNet), ArcFace alignment and embedding,
and the keypoint control image. numpy + OpenCV + ONNX Runtime only."""
from runtime.face.align import estimate_norm, norm_crop
from runtime.face.analyzer import ArcFace, FaceAnalyzer, FaceIndexError, NoFaceError, packaged_yunet
from runtime.face.detect import Face, SCRFDDetector, YuNetDetector
from runtime.face.draw import draw_kps

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
    "norm_crop",
    "packaged_yunet",
]
