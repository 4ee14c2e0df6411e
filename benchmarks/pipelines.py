"""The two baseline pipelines: `InstantIDBaseline` and `IPAdapterBaseline` (see `benchmarks.baseline`).

They take the runtime's request objects (runtime/requests.py) or their fields, so a baseline call
and a runtime call of the same fields run the same settings and defaults:

    baseline = open_baseline("ip-adapter-plus", "tiny")                 # IPAdapterBaseline(plus=True)
    result = baseline(IPAdapterRequest(photo, "a cat", steps=4))        # or baseline(photo, "a cat", steps=4)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.baseline import Result, SDXLBase, default_device_dtype
from export import loaders
from export.sources import PIPELINE_PARTS
from export.specs import ModelSpec, get_spec
from runtime.pipelines import pipeline_entry
from runtime.requests import InstantIDRequest, IPAdapterRequest, as_request


def _spec(model: str | ModelSpec, weights_dir: Path | None, random_init: bool, parts: tuple[str, ...]) -> ModelSpec:
    """The model's spec sized from its checkpoint files (export.checkpoint_dims): only `parts` are read."""
    from export.checkpoint_dims import checkpoint_spec

    spec = get_spec(model) if isinstance(model, str) else model
    return checkpoint_spec(spec, weights_dir, random_init, parts)


def control_tensor(kps_image: np.ndarray) -> torch.Tensor:
    """kps image (H, W, 3) uint8 RGB -> (1, 3, H, W) float in [0, 1], the ControlNet's input."""
    return torch.from_numpy(np.ascontiguousarray(kps_image)).permute(2, 0, 1)[None].float() / 255.0


class InstantIDBaseline(SDXLBase):
    """InstantID on SDXL: face embedding -> Resampler tokens; kps image -> IdentityNet; decoupled attention."""

    def __init__(self, model: str | ModelSpec = "tiny", weights_dir: Path | None = None, random_init: bool = False,
                 device: str | None = None, dtype: torch.dtype | None = None, face_analyzer=None,
                 vae_fp16_fix: bool = False):
        device, dtype = default_device_dtype(device, dtype)
        spec = _spec(model, weights_dir, random_init, PIPELINE_PARTS["instantid"])
        super().__init__(spec, weights_dir, random_init, device, dtype, vae_fp16_fix)
        self.controlnet = loaders.load_controlnet(spec, weights_dir, random_init, dtype, device)
        sized, ip_state = loaders.load_instantid_adapter(spec, self.unet, weights_dir, random_init, dtype, device)
        self.resampler = self.attach_adapter(sized.state_dict(), ip_state)  # diffusers' IPAdapterPlusImageProjection
        self.resampler.config = sized.config  # the sizes read from the checkpoint
        self.face_analyzer = face_analyzer
        self._negative_tokens = None

    @torch.no_grad()
    def face_tokens(self, face_embedding: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ArcFace embedding(s) (512,) or (N, 512) -> (tokens (N,16,C), negative = Resampler(0) (1,16,C))."""
        embedding = torch.as_tensor(np.asarray(face_embedding), dtype=self.dtype, device=self.device).reshape(
            -1, 1, self.resampler.config.embedding_dim)
        if self._negative_tokens is None:  # input-independent: computed once
            self._negative_tokens = self.resampler(torch.zeros_like(embedding[:1]))
        return self.resampler(embedding), self._negative_tokens

    def generate(self, face_embedding, kps_image: np.ndarray, request_or_prompt, negative_prompt: str | None = None,
                 *, decode: bool = True, **fields) -> Result:
        """Generate from a face embedding (512,) and a kps image (H, W, 3) uint8; output is H x W. Takes an
        InstantIDRequest or its fields (prompt, negative_prompt, steps=..., ...; no photo needed)."""
        given = isinstance(request_or_prompt, InstantIDRequest)
        request = as_request(InstantIDRequest, *((request_or_prompt, None) if given else (None, request_or_prompt)),
                             negative_prompt, fields)
        height, width = kps_image.shape[:2]
        tokens, negative_tokens = self.face_tokens(face_embedding)
        embeds, pooled, negative_embeds, negative_pooled = self.encode_prompt(request.prompt, request.negative_prompt)
        latents = self.denoise(prompt_embeds=embeds, pooled=pooled, negative_embeds=negative_embeds,
                               negative_pooled=negative_pooled, tokens=tokens, negative_tokens=negative_tokens,
                               height=height, width=width, num_images=request.num_images, steps=request.steps,
                               guidance=request.guidance, ip_scale=request.ip_scale, seed=request.seed,
                               scheduler=request.scheduler, controlnet=self.controlnet,
                               control_image=control_tensor(kps_image), controlnet_scale=request.controlnet_scale,
                               control_guidance_start=request.control_guidance_start,
                               control_guidance_end=request.control_guidance_end)
        return Result(self.decode(latents) if decode else [], latents)

    def __call__(self, request_or_image, prompt: str | None = None, negative_prompt: str | None = None, *,
                 decode: bool = True, **fields) -> Result:
        """Full InstantID: identity from the request's `image`, pose (kps) from `pose_image` or `image`.

        Faces are found on each photo at its own aspect ratio and the reference's detection size
        (infer.py's resize, whatever the output size); the kps image is drawn at width x height, or
        without them at the pose photo's InstantID size at the model's resolution — the runtime's
        `runtime.pipelines.face_conditioning`, shared so both pipelines see the same conditioning.
        """
        from runtime.pipelines import face_conditioning

        if self.face_analyzer is None:
            raise ValueError("this pipeline has no face analyzer: pass face_analyzer=FaceAnalyzer(...)")
        request = as_request(InstantIDRequest, request_or_image, prompt, negative_prompt, fields)
        face, kps_image = face_conditioning(self.face_analyzer, request.image, request.pose_image, request.width,
                                            request.height, self.spec.default_resolution, request.face_index)
        return self.generate(face.embedding, kps_image, request, decode=decode)


class IPAdapterBaseline(SDXLBase):
    """IP-Adapter SDXL (ViT-H): CLIP image embedding -> ImageProj (plain) or Resampler (Plus) tokens."""

    def __init__(self, model: str | ModelSpec = "tiny", plus: bool = False, weights_dir: Path | None = None,
                 random_init: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
                 vae_fp16_fix: bool = False):
        from transformers import CLIPImageProcessor

        device, dtype = default_device_dtype(device, dtype)
        spec = _spec(model, weights_dir, random_init, PIPELINE_PARTS["ip-adapter-plus" if plus else "ip-adapter"])
        super().__init__(spec, weights_dir, random_init, device, dtype, vae_fp16_fix)
        self.plus = plus
        self.image_encoder = loaders.load_image_encoder(spec, weights_dir, random_init, dtype, device)
        sized, ip_state = loaders.load_ip_adapter(spec, self.unet, plus, weights_dir, random_init, dtype, device)
        self.projector = self.attach_adapter(sized.state_dict(), ip_state)  # diffusers' projector
        self.projector.config = sized.config  # the sizes read from the checkpoint
        self.processor = CLIPImageProcessor()
        self._negative_tokens = None

    def pixel_values(self, image) -> torch.Tensor:
        """An image (path, bytes, PIL, RGB array) -> CLIP pixel values (1, 3, 224, 224)."""
        from runtime.images import load_image

        pixels = self.processor(images=Image.fromarray(load_image(image)), return_tensors="pt").pixel_values
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.plus:
            return self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        return self.image_encoder(pixels).image_embeds

    @torch.no_grad()
    def image_tokens(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (1, K, C), negative tokens (1, K, C)) for a reference image; the negative is cached."""
        pixels = self.pixel_values(image)
        embeds = self._embed(pixels)
        if self._negative_tokens is None:
            negative = self._embed(torch.zeros_like(pixels)) if self.plus else torch.zeros_like(embeds)
            self._negative_tokens = self.projector(negative)
        return self.projector(embeds), self._negative_tokens

    def __call__(self, request_or_image, prompt: str | None = None, negative_prompt: str | None = None, *,
                 decode: bool = True, **fields) -> Result:
        """Generate `num_images` images (width x height, default the model's resolution) from an image prompt:
        an IPAdapterRequest or its fields."""
        request = as_request(IPAdapterRequest, request_or_image, prompt, negative_prompt, fields)
        size = self.spec.default_resolution
        tokens, negative_tokens = self.image_tokens(request.image)
        embeds, pooled, negative_embeds, negative_pooled = self.encode_prompt(request.prompt, request.negative_prompt)
        latents = self.denoise(prompt_embeds=embeds, pooled=pooled, negative_embeds=negative_embeds,
                               negative_pooled=negative_pooled, tokens=tokens, negative_tokens=negative_tokens,
                               height=request.height or size, width=request.width or size,
                               num_images=request.num_images, steps=request.steps, guidance=request.guidance,
                               ip_scale=request.ip_scale, seed=request.seed, scheduler=request.scheduler)
        return Result(self.decode(latents) if decode else [], latents)


def open_baseline(name: str, model: str | ModelSpec = "tiny", **kwargs):
    """The baseline of the runtime pipeline `name` (runtime.pipelines.PIPELINES), with that entry's
    options (e.g. plus=True); kwargs: the baseline class's (weights_dir, random_init, device, dtype, ...)."""
    entry = pipeline_entry(name)
    baseline = InstantIDBaseline if issubclass(entry.request_type, InstantIDRequest) else IPAdapterBaseline
    return baseline(model, **dict(entry.options), **kwargs)
