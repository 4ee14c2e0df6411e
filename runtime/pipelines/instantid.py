"""InstantID on SDXL: face photo -> identity (ArcFace -> face tokens) + pose (kps -> IdentityNet).

    pipe = InstantIDPipeline.from_build("build/tiny", backend="onnxruntime")
    images = pipe("photo.jpg", "a portrait, oil painting", steps=30, seed=0)    # list of PIL images
    images = pipe(InstantIDRequest("photo.jpg", "a portrait, oil painting"))    # the same request

Requests that agree on their loop settings (size, steps, guidance, scales, scheduler) can share one
loop call, their rows stacked (what a server's micro-batching does):

    jobs = [pipe.prepare(photo, prompt, seed=s) for photo, prompt, s in requests]   # Prepared each
    results = pipe.run(jobs)     # per request: its Generation, or its own NonFiniteError
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.images import ImageSource, load_image
from runtime.pipelines.sdxl import Generation, Prepared, _output, _SDXLPipeline
from runtime.requests import InstantIDRequest
from runtime.sessions import Session, open_session


def control_tensor(kps_image: np.ndarray) -> torch.Tensor:
    """kps image (H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [0, 1], the ControlNet's input."""
    return torch.from_numpy(np.ascontiguousarray(kps_image)).permute(2, 0, 1)[None].float() / 255.0


class InstantIDPipeline(_SDXLPipeline):
    """InstantID: face photo -> identity (ArcFace -> face tokens) + pose (kps -> IdentityNet)."""

    unet_component = "unet_instantid"
    uses_controlnet = True
    request_type = InstantIDRequest

    def __init__(self, build_dir, backend="onnxruntime", *, face_analyzer=None, face_on_device: bool | None = None,
                 **kwargs):
        super().__init__(build_dir, backend, **kwargs)
        self.face_proj = self.open("face_proj")
        self._face_analyzer = face_analyzer
        self.face_on_device = self.device.type == "cuda" if face_on_device is None else face_on_device

    @property
    def face_analyzer(self):
        """The face analyzer (unless one was given): runtime.face.FaceAnalyzer, photo uploaded once,
        letterbox, decoding, NMS, warp and normalisation in torch. On a GPU pipeline (or
        face_on_device=True) on the pipeline's device, detector and ArcFace as the backend's engines
        where built (else ONNX Runtime); otherwise on the CPU over the build's ONNX in ONNX Runtime."""
        if self._face_analyzer is None:
            if self.face_on_device:
                from runtime.face import FaceAnalyzer

                sessions = [self._face_session(component) for component in ("face_detector", "arcface")]
                self._face_analyzer = FaceAnalyzer.from_sessions(*sessions, device=self.device)
            else:
                self._face_analyzer = self.assets.face_analyzer(self._open_args["verify_sha256"])
        return self._face_analyzer

    def _face_session(self, component: str) -> Session:
        """The face model's engine under a TensorRT backend when built, else its ONNX in ONNX Runtime.
        AssetError (as the host analyzer's) when the build has no such model."""
        from runtime.assets import AssetError

        entry = self.manifest.components.get(component)
        if entry is None or entry.onnx is None:
            raise AssetError(f"{self.build_dir} has no {component}: export it (python -m export.build --model "
                             f"{self.manifest.model} --pipeline instantid --out {self.build_dir}) or pass face_analyzer=")
        if self.backend in ("tensorrt", "tensorrt-rtx") and entry is not None and entry.engine is not None:
            return self.open(component)
        return open_session(self.build_dir, component, "onnxruntime", manifest=self.manifest,
                            threads=self._open_args["threads"], verify_sha256=self._open_args["verify_sha256"])

    def face_tokens(self, embedding: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ArcFace embedding (512,) or (N, 512) -> (tokens (N, 16, C), negative Resampler(0) (1, 16, C))."""
        embedding = torch.as_tensor(np.asarray(embedding), dtype=torch.float32).reshape(-1, self._embedding_dim)
        negative = self.cached_constant("negative_tokens_instantid", lambda: self.face_proj.run(
            {"face_embedding": torch.zeros(1, self._embedding_dim)})["face_tokens"])
        return self.face_proj.run({"face_embedding": embedding})["face_tokens"].to(self.device).clone(), negative

    @property
    def _embedding_dim(self) -> int:
        return self.face_proj.input("face_embedding").shape[1]

    def prepare_embedding(self, face_embedding, kps_image: np.ndarray, request_or_prompt, negative_prompt=None,
                          **fields) -> Prepared:
        """The loop's conditioning from a face embedding (512,) and a kps image (H, W, 3) uint8 (output H x W),
        for an InstantIDRequest or the keyword form (prompt, negative_prompt, **fields; no photo needed)."""
        given = isinstance(request_or_prompt, InstantIDRequest)
        request = self.request(*((request_or_prompt, None) if given else (None, request_or_prompt)), negative_prompt,
                               **fields)
        height, width = kps_image.shape[:2]
        tokens, negative_tokens = self.face_tokens(face_embedding)
        return self._prepared(request, tokens, negative_tokens, height, width, control_tensor(kps_image))

    def prepare(self, request_or_image, prompt=None, negative_prompt=None, **fields) -> Prepared:
        """`__call__`'s work before the loop: face analysis, face tokens, kps image, prompts (see `run`)."""
        request = self.request(request_or_image, prompt, negative_prompt, **fields)
        if request.image is None:
            raise ValueError("no face photo: give the request's image (a path, bytes, PIL image or RGB array)")
        resolution = int(self.assets.value("default_resolution", 1024))
        face, kps_image = face_conditioning(self.face_analyzer, request.image, request.pose_image, request.width,
                                            request.height, resolution, request.face_index)
        return self.prepare_embedding(face.embedding, kps_image, request)

    def generate(self, face_embedding, kps_image: np.ndarray, request_or_prompt, negative_prompt=None, *,
                 decode: bool = True, **fields) -> Generation:
        """From a face embedding (512,) and a kps image (H, W, 3) uint8; output H x W (the baseline's generate)."""
        return self._run_one(self.prepare_embedding(face_embedding, kps_image, request_or_prompt, negative_prompt,
                                                    **fields), decode)

    def __call__(self, request_or_image, prompt=None, negative_prompt=None, *, return_latents: bool = False,
                 decode: bool = True, progress=None, **fields):
        """Identity from the request's `image`, pose (kps) from `pose_image` or `image` -> list of PIL images.

        Takes an InstantIDRequest, or its fields: pipe(image, prompt, steps=..., seed=...).
        Faces are found as the reference finds them, whatever the output size (`face_conditioning`);
        the output is width x height, or without them the pose photo's InstantID size at the model's
        resolution (SDXL: infer.py's). Raises NoFaceError when a photo has no face, ImageError for
        a photo too elongated, ResolutionError for a size the build cannot serve, NonFiniteError on NaN,
        RequestError for a field out of bounds. With return_latents=True returns a Generation (images
        and final latents).
        """
        generation = self._run_one(self.prepare(request_or_image, prompt, negative_prompt, **fields), decode, progress)
        return _output(generation, return_latents)


def face_conditioning(analyzer, photo: ImageSource, pose_photo: ImageSource | None = None,
                      width: int | None = None, height: int | None = None, resolution: int = 1024,
                      face_index: int | None = None):
    """InstantID's face inputs from photos, as the reference pipeline computes them -> (face, kps image).

    Each photo is analysed at its own aspect ratio, at the reference's detection size whatever the
    output size: InstantID's infer.py resize (short side 1024, long side 1280, floored to 64 px),
    then the detector's own letterbox (640 x 640). The identity (face: bbox, kps, raw embedding) comes
    from `photo`; the pose (kps) from `pose_photo`, else from the same face.
    The kps image (H, W, 3) uint8 is drawn at the output size: width x height when both are given,
    else the pose photo's InstantID size at the model's `resolution` (`images.model_size`; for SDXL
    the detection size itself, so the kps are exactly the reference's). When the output's aspect
    differs from the photo's, the kps are mapped as a cover-resize would map the photo (one scale,
    no squashing), cropped around the pose face (`images.cover_map`).
    analyzer: FaceAnalyzer (`analyze(rgb, face_index)`, `pose_kps(rgb)`).
    Raises NoFaceError / FaceIndexError, ImageError (unreadable or too elongated photo), ValueError
    when only one of width / height is given.
    """
    from runtime.face import draw_kps
    from runtime.images import cover_map, model_size, resize_for_instantid

    if (width is None) != (height is None):
        raise ValueError("give both width and height (the output size), or neither (the pose photo's InstantID "
                         f"size at the model's resolution, short side {resolution})")
    face_rgb = resize_for_instantid(load_image(photo))
    face = analyzer.analyze(face_rgb, face_index=face_index)
    if pose_photo is None:
        pose_rgb, kps = face_rgb, face.kps
    else:
        pose_rgb = resize_for_instantid(load_image(pose_photo))
        kps = analyzer.pose_kps(pose_rgb)
    pose_size = (pose_rgb.shape[1], pose_rgb.shape[0])
    canvas = (width, height) if width and height else model_size(*pose_size, resolution)
    mapping = cover_map(pose_size, canvas, focus=tuple(np.asarray(kps, np.float64).mean(axis=0)))
    return face, draw_kps(canvas[0], canvas[1], mapping.points(kps))
