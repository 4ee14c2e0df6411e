"""IP-Adapter (plain and Plus) on SDXL: reference image -> CLIP image encoder -> image tokens.

    pipe = IPAdapterPipeline.from_build("build/tiny", plus=True)
    images = pipe("reference.jpg", "a cat in a hat", steps=30, seed=0)         # list of PIL images
    images = pipe(IPAdapterRequest("reference.jpg", "a cat in a hat"))         # the same request
"""
from __future__ import annotations

import torch

from runtime.clip_image import clip_pixel_values
from runtime.images import ImageSource, load_image
from runtime.pipelines.sdxl import Prepared, _output, _SDXLPipeline
from runtime.requests import IPAdapterRequest


class IPAdapterPipeline(_SDXLPipeline):
    """IP-Adapter SDXL: reference image -> CLIP image encoder -> ImageProj (4 tokens) or Resampler (Plus, 16)."""

    request_type = IPAdapterRequest

    @classmethod
    def unet_for(cls, plus: bool = False, **options) -> str:
        """'unet_ip_adapter_plus' with plus=True, else 'unet_ip_adapter'."""
        return "unet_ip_adapter_plus" if plus else "unet_ip_adapter"

    def __init__(self, build_dir, backend="onnxruntime", *, plus: bool = False, **kwargs):
        self.plus = plus
        self.unet_component = self.unet_for(plus=plus)
        super().__init__(build_dir, backend, **kwargs)
        self.image_encoder = self.open("image_encoder")
        self.projector = self.open("image_proj_plus" if plus else "image_proj")

    def _project(self, pixels: torch.Tensor) -> torch.Tensor:
        encoded = self.image_encoder.run({"pixel_values": pixels})
        if self.plus:
            return self.projector.run({"hidden_states": encoded["hidden_states"]})["ip_tokens"]
        return self.projector.run({"image_embeds": encoded["image_embeds"]})["ip_tokens"]

    def image_tokens(self, image: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (1, K, C), negative tokens (1, K, C)) for a reference image; the negative is cached."""
        pixels = torch.from_numpy(clip_pixel_values(load_image(image)))
        if self.plus:
            negative = self.cached_constant("negative_tokens_ip_adapter_plus", lambda: self._project(torch.zeros_like(pixels)))
        else:
            width = self.projector.input("image_embeds").shape[1]
            negative = self.cached_constant("negative_tokens_ip_adapter", lambda: self.projector.run(
                {"image_embeds": torch.zeros(1, width)})["ip_tokens"])
        return self._project(pixels).to(self.device).clone(), negative

    def prepare(self, request_or_image, prompt=None, negative_prompt=None, **fields) -> Prepared:
        """`__call__`'s work before the loop: image tokens and prompts (see `run`)."""
        request = self.request(request_or_image, prompt, negative_prompt, **fields)
        if request.image is None:
            raise ValueError("no reference image: give the request's image (a path, bytes, PIL image or RGB array)")
        size = int(self.assets.value("default_resolution", 1024))
        tokens, negative_tokens = self.image_tokens(request.image)
        return self._prepared(request, tokens, negative_tokens, request.height or size, request.width or size)

    def __call__(self, request_or_image, prompt=None, negative_prompt=None, *, return_latents: bool = False,
                 decode: bool = True, progress=None, **fields):
        """`num_images` images (width x height, default the build's resolution) prompted by the request's image.

        Takes an IPAdapterRequest, or its fields: pipe(image, prompt, steps=..., seed=...). Returns a
        list of PIL images (a Generation with the latents when return_latents=True).
        """
        generation = self._run_one(self.prepare(request_or_image, prompt, negative_prompt, **fields), decode, progress)
        return _output(generation, return_latents)
