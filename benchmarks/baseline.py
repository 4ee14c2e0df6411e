"""PyTorch baseline pipelines: InstantID and IP-Adapter (plain and Plus) on SDXL, and IP-Adapter on
SD1.5, from diffusers modules.

They reproduce the reference data flow (REFERENCE.md) and are the oracle of every parity test
and the yardstick of every benchmark:

- SDXL: prompt -> both CLIP text encoders -> penultimate hidden states concatenated (77·k x 2048,
  k chunks of 75 tokens, weighting applied: the runtime's own encoding, benchmarks/baseline_text.py,
  equal to compel's) and the pooled projection, with time_ids as added conditioning;
  `negative_prompt=None` gives zero negatives (SDXL's force_zeros_for_empty_prompt);
- SD1.5 (diffusers' StableDiffusionPipeline): prompt -> the one CLIP text encoder's last hidden
  state (77·k x 768), no added conditioning; `negative_prompt=None` encodes the empty prompt "";
- image tokens attended beside the text tokens; negatives: Resampler(0) (InstantID), ImageProj(0)
  (IP-Adapter), encoder(zero image) -> Resampler (IP-Adapter Plus);
- IdentityNet gets the face tokens only as context, the kps image and the conditioning scale;
- decoupled attention in every attn2 layer with scale λ (float or per layer), and the image-token
  projectors, built by diffusers' own IP-Adapter loader (`IPAdapterAttnProcessor2_0`,
  `ImageProjection`, `IPAdapterPlusImageProjection`) from the checkpoints' state dicts, so the
  oracle shares no adapter code with the exported graphs (export.adapters);
- Euler (or another diffusers scheduler), CFG [negative, positive], VAE in fp32.

Batch > 1 (`num_images`) repeats every conditioning tensor, unlike upstream InstantID.
Noise comes from a CPU `torch.Generator` seeded with `seed`, so results do not depend on device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export import loaders
from export.specs import ModelSpec
from benchmarks.baseline_text import torch_prompt_encoder
from runtime.ip_scales import BlockScales, parse_block_scales

SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),  # step(eta=0.3), its default: the runtime's tcd preset
}


def make_scheduler(config: dict, name: str = "euler"):
    """A diffusers scheduler of kind `name` (see SCHEDULERS) built from a scheduler_config dict."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {sorted(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**config, **overrides})


@dataclass
class Result:
    """Images (PIL, RGB) and the final latents (B, 4, H/8, W/8) before VAE decoding."""

    images: list[Image.Image]
    latents: torch.Tensor


def default_device_dtype(device: str | None = None, dtype: torch.dtype | None = None):
    """(device, dtype): cuda + fp16 when a GPU is present, else cpu + fp32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)


class SDXLBase:
    """Text encoders, UNet (with decoupled attention), VAE and the denoising loop shared by the pipelines
    (SDXL's two text encoders and added conditioning, or SD1.5's one encoder and none, per the spec)."""

    def __init__(self, spec: ModelSpec, weights_dir: Path | None, random_init: bool, device, dtype,
                 vae_fp16_fix: bool = False):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.text = loaders.load_text_stack(spec, weights_dir, random_init, dtype, device)
        self.prompts = torch_prompt_encoder(self.text, spec, device)
        self.unet = loaders.load_unet(spec, weights_dir, random_init, dtype, device)
        vae_dtype = dtype if vae_fp16_fix else torch.float32
        self.vae = loaders.load_vae(spec, weights_dir, random_init, vae_dtype, device, fp16_fix=vae_fp16_fix)
        self.scheduler_config = loaders.load_scheduler_config(spec, weights_dir, random_init)
        self.ip_layers: list = []

    # -- conditioning -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds (B,77·k,C), pooled (B,P), negative_embeds, negative_pooled) for B prompts, every row
        k chunks long (runtime.text.PromptEncoder.rows); the pooled pair is None without a second text
        encoder (SD1.5)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None if negative_prompt is None else \
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        embeds, pooled, negative_embeds, negative_pooled = self.prompts.rows(prompts, negatives)
        if self.text.text_encoder_2 is None:
            pooled = negative_pooled = None
        else:
            pooled, negative_pooled = pooled.to(self.dtype), negative_pooled.to(self.dtype)
        return embeds.to(self.dtype), pooled, negative_embeds.to(self.dtype), negative_pooled

    def time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """SDXL micro-conditioning (batch, 6): original size, crop (0, 0), target size."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return ids.repeat(batch, 1)

    def initial_latents(self, num_images: int, height: int, width: int, generator: torch.Generator,
                        init_noise_sigma: float) -> torch.Tensor:
        """Seeded Gaussian latents (num_images, 4, H/8, W/8) drawn on the CPU, scaled by the scheduler."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the loaded VAE's, not the spec's
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        shape = (num_images, self.unet.config.in_channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (latents * init_noise_sigma).to(self.device, self.dtype)

    # -- adapters -----------------------------------------------------------------------------
    def attach_adapter(self, proj_state: dict, ip_state: dict) -> torch.nn.Module:
        """Install diffusers' `IPAdapterAttnProcessor2_0` on every attn2 layer from a checkpoint's
        (`image_proj`, `ip_adapter`) state dicts; returns diffusers' image-token projector.

        The layers are keyed `'{i}.to_k_ip.weight'` with `i` odd, as diffusers' loader reads them.
        The image tokens are passed to the UNet as diffusers' `(text, [tokens])` tuple, so the
        processors' own token count (diffusers assumes 4 for plain IP-Adapter) is never used.
        """
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        unet = self.unet
        processors = unet._convert_ip_adapter_attn_to_diffusers([{"image_proj": proj_state, "ip_adapter": ip_state}],
                                                                low_cpu_mem_usage=False)
        for processor in processors.values():
            if isinstance(processor, IPAdapterAttnProcessor2_0):
                processor.to(self.device, self.dtype)
        unet.set_attn_processor(processors)
        self.ip_layer_names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
        self.ip_layers = [unet.attn_processors[name] for name in self.ip_layer_names]
        return diffusers_image_projection(unet, proj_state).to(self.device, self.dtype).eval()

    # -- loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, *, prompt_embeds, pooled, negative_embeds, negative_pooled, tokens, negative_tokens,
                height, width, num_images, steps, guidance, ip_scale, seed, scheduler="euler",
                controlnet=None, control_image=None, controlnet_scale=1.0, control_guidance_start=0.0,
                control_guidance_end=1.0) -> torch.Tensor:
        """Run the sampling loop; returns final latents (num_images, 4, H/8, W/8).

        prompt_embeds/negative_embeds (1|N, 77, C); pooled (1|N, P); tokens/negative_tokens
        (1|N, K, C) image tokens; control_image (1, 3, H, W) in [0, 1] for the ControlNet,
        which then gets the image tokens (not the text) as its context. ip_scale: a float, one per
        layer, or a block dict / preset (runtime.ip_scales). The ControlNet's step window is diffusers'
        (StableDiffusionXLControlNetPipeline): step i of N scales it by 0 when i/N < start or (i+1)/N > end.
        """
        set_ip_scale(self.ip_layers, ip_scale, self.ip_layer_names)
        cfg = guidance > 1.0

        def batch(x):  # repeat (1|N, ...) conditioning to num_images rows
            return x.repeat_interleave(num_images // x.shape[0], dim=0) if x.shape[0] != num_images else x

        text, face = batch(prompt_embeds), batch(tokens)
        if cfg:
            text = torch.cat([batch(negative_embeds), text])
            face = torch.cat([batch(negative_tokens), face])
        context = (text, [face])  # diffusers' IP-Adapter form: text tokens, one image-token set
        rows = text.shape[0]
        added = None  # SD1.5: no added conditioning
        if self.unet.config.addition_embed_type == "text_time":
            text_embeds = torch.cat([batch(negative_pooled), batch(pooled)]) if cfg else batch(pooled)
            added = {"text_embeds": text_embeds, "time_ids": self.time_ids(height, width, rows)}
        if controlnet is not None:
            control = control_image.to(self.device, self.dtype).repeat(rows, 1, 1, 1)

        sched = make_scheduler(self.scheduler_config, scheduler)
        sched.set_timesteps(steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = self.initial_latents(num_images, height, width, generator, sched.init_noise_sigma)
        count = len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            residuals = {}
            if controlnet is not None:
                keep = 1.0 - float(i / count < control_guidance_start or (i + 1) / count > control_guidance_end)
                down, mid = controlnet(model_in, t, encoder_hidden_states=face, controlnet_cond=control,
                                       conditioning_scale=controlnet_scale * keep, added_cond_kwargs=added,
                                       return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            noise = self.unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added,
                              return_dict=False, **residuals)[0]
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = sched.step(noise, t, latents, generator=generator, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 4, h, w) -> B PIL RGB images, as diffusers' postprocessing does."""
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]


def diffusers_image_projection(unet, proj_state: dict) -> torch.nn.Module:
    """diffusers' projector for an `image_proj` state dict: `IPAdapterPlusImageProjection` (InstantID's
    face Resampler, IP-Adapter Plus) through the UNet's own converter, or `ImageProjection` (plain).

    diffusers' converter fixes plain IP-Adapter at 4 tokens (the published checkpoint's); the
    token count is read here from the tensors (`proj` rows / `norm` width) and the keys are renamed
    as the converter renames them.
    """
    if "proj.weight" not in proj_state:
        return unet._convert_ip_adapter_image_proj_to_diffusers(proj_state, low_cpu_mem_usage=False)
    from diffusers.models.embeddings import ImageProjection

    rows, embed_dim = proj_state["proj.weight"].shape
    width = proj_state["norm.weight"].shape[0]
    module = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=width, num_image_text_embeds=rows // width)
    module.load_state_dict({key.replace("proj", "image_embeds"): value for key, value in proj_state.items()})
    return module


def set_ip_scale(layers: list, scale, names: list[str] | None = None) -> None:
    """λ on every diffusers IP-Adapter layer (a float), per layer (a sequence as long as `layers`), or per
    block (a diffusers block dict, a preset name or BlockScales: runtime.ip_scales, over the layers' `names`)."""
    if isinstance(scale, (str, dict, BlockScales)):
        if names is None:
            raise ValueError("a per-block ip_scale needs the layers' names")
        scale = parse_block_scales(scale).layer_scales(names)
    scales = [float(scale)] * len(layers) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(layers):
        raise ValueError(f"ip_scale has {len(scales)} values but the UNet has {len(layers)} cross-attention layers")
    for layer, value in zip(layers, scales):
        layer.scale = [value]
