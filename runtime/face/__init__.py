"""Face analysis for InstantID: detection (SCRFD / YuNet), ArcFace alignment and embedding,
and the keypoint control image. numpy + OpenCV + ONNX Runtime only.

The same steps on torch tensors (CPU or CUDA, for TensorRT sessions): `runtime.face.device`
(letterbox, warp, normalisation, decoding) and `runtime.face.device_analyzer.DeviceFaceAnalyzer`,
imported from there so the host path never loads torch."""
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
