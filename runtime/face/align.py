"""ArcFace alignment: 5 landmarks -> similarity transform to the 112×112 (or 128×128) crop.

Equivalent to insightface's `utils.face_align.estimate_norm` (scikit-image's SimilarityTransform,
i.e. Umeyama's least-squares similarity), in numpy on the host: a 5-point fit. The warp itself is
`runtime.face.image_ops.norm_crop_tensor`.
"""
from __future__ import annotations

import numpy as np

ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
"""Landmark template of a 112×112 ArcFace crop, in `Face.kps` order (eyes, nose, mouth corners)."""


def arcface_template(image_size: int = 112) -> np.ndarray:
    """Template points (5, 2) float32 for a square crop of `image_size` pixels.

    Multiples of 112 scale the template; multiples of 128 scale it by image_size/128 and shift
    it right by 8·image_size/128 (insightface's 128-px variant). Other sizes raise ValueError.
    """
    if image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio, shift_x = image_size / 128.0, 8.0 * image_size / 128.0
    else:
        raise ValueError(f"ArcFace crops are 112·k or 128·k pixels, got {image_size}: use 112 (ArcFace/glintr100)")
    template = ARCFACE_DST * ratio  # float32, as insightface computes it
    template[:, 0] += shift_x
    return template


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    src, dst: (N, 2) points. Returns the (3, 3) homogeneous matrix T with dst ≈ T·[src; 1]
    (Umeyama 1991, reflection excluded). Raises ValueError for degenerate (coincident) src.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    covariance = dst_centred.T @ src_centred / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    rank = np.linalg.matrix_rank(covariance)
    if rank == 0:
        raise ValueError("landmarks are degenerate (all points coincide): no alignment is possible; re-detect the face")
    signs = np.array([1.0, -1.0]) if np.linalg.det(covariance) < 0 else np.ones(2)
    if rank == 1:  # collinear points: keep a proper rotation whatever det(covariance) says
        flip = np.ones(2) if np.linalg.det(u) * np.linalg.det(vt) > 0 else np.array([1.0, -1.0])
        rotation = u @ np.diag(flip) @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = float(singular @ signs) / src_centred.var(axis=0).sum()
    matrix = np.eye(3)
    matrix[:2, :2] = scale * rotation
    matrix[:2, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def estimate_norm(kps: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Affine (2, 3) float64 matrix taking image pixels to the aligned crop.

    kps: (5, 2) landmarks in `Face.kps` order. image_size: crop side (112·k or 128·k).
    """
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"kps must have shape (5, 2) (eyes, nose, mouth corners), got {kps.shape}")
    return umeyama_similarity(kps, arcface_template(image_size))[:2, :]

