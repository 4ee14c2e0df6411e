"""What InstantID and IP-Adapter share on SDXL (and IP-Adapter on SD1.5): text encoders, UNet
(+ ControlNet), VAE decoder sessions, the prompt cache, and the stacked denoising loop
(`_SDXLPipeline.run`).

The data flow is the baseline's (benchmarks/baseline.py, benchmarks/pipelines.py), reproduced
step for step: same preprocessing, CFG rows [negative, positive], `negative_prompt=None` -> zero
text negatives (SD1.5: the empty prompt encoded), time_ids (H, W, 0, 0, H, W) where the UNet takes
them (SDXL), seeded CPU noise drawn as diffusers draws it. The text encoders (SDXL's two, SD1.5's
one) are the ones the build's model facts list (runtime.text.PromptEncoder). λ (per
layer), the ControlNet scale and the guidance are runtime inputs: changing them needs no rebuild
and no new CUDA graph. A pipeline's `prepare(request)` turns its request (runtime/requests.py)
into a `Prepared`; `run(prepared_list)` stacks those with equal `LoopSettings` into one loop call.
A build exported with `--controlnet NAME=PATH` has extra ControlNets: a request's `controls` run them
beside the IdentityNet (or alone, IP-Adapter), their residuals summed (runtime/controlnets.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.manifest import load_manifest
from runtime.assets import AssetError, Assets
from runtime.controlnets import MultiControlNet, build_controlnets, prepare_controls, stacked_control_feeds
from runtime.control_window import control_window, zero_residuals
from runtime.ip_scales import BlockScaleError, BlockScales
from runtime.loop import DenoiseCancelled, DenoiseLoop, LoopInputs, Progress, unet_conditioning
from runtime.requests import (PIXEL_MULTIPLE, GenerateRequest, LoopSettings, ResolutionError, as_request, loop_settings,
                              round_size)
from runtime.schedulers import build_scheduler, draw_noise
from runtime.sessions import DeviceMemoryPool, Session, normalize_backend, open_session
from runtime.text import prompt_encoder, text_capacity

PROMPT_CACHE_SIZE = 16


class NonFiniteError(RuntimeError):
    """The pipeline produced NaN or Inf values (raised instead of returning a black image)."""


@dataclass
class Generation:
    """images: B PIL RGB images; latents: (B, 4, H/8, W/8) float32 final latents before decoding;
    warnings: what the user should know about the result (a prompt truncated to the UNet's text axis)."""

    images: list[Image.Image]
    latents: torch.Tensor
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """One request's conditioning, ready for the loop (the pipelines' `prepare`); N = num_images.

    request: what was asked; settings: its loop settings at the output size.
    tokens / negative_tokens: (N, T, C) text tokens, T = 77·k (k prompt chunks, `settings.text_tokens`);
    pooled / negative_pooled: (N, P);
    image_tokens / negative_image_tokens: (N, K, C); control_image: (1, 3, H, W) in [0, 1] (InstantID).
    controls: the extra ControlNets' ((component, scale, control image (1, 3, H, W) in [0, 1]), ...).
    """

    request: GenerateRequest
    settings: LoopSettings
    tokens: torch.Tensor
    pooled: torch.Tensor
    negative_tokens: torch.Tensor
    negative_pooled: torch.Tensor
    image_tokens: torch.Tensor
    negative_image_tokens: torch.Tensor
    control_image: torch.Tensor | None = None
    controls: tuple = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def num_images(self) -> int:
        return self.request.num_images


class _SDXLPipeline:
    """Text encoders, UNet (+ ControlNet), VAE decoder sessions, the prompt cache and the loop."""

    unet_component = ""
    uses_controlnet = False
    request_type: type[GenerateRequest] = GenerateRequest

    @classmethod
    def unet_for(cls, **options) -> str:
        """The build's UNet component this pipeline runs with `from_build` options (e.g. plus=True)."""
        return cls.unet_component

    def __init__(self, build_dir: str | os.PathLike, backend: str = "onnxruntime", *, device=None,
                 loop_mode: str = "auto", verify_sha256: bool = True, threads: int | None = None,
                 sessions: dict[str, Session] | None = None, memory: DeviceMemoryPool | None = None,
                 trust_programs: bool = False):
        self.build_dir = Path(build_dir)
        self.backend = normalize_backend(backend)
        self.manifest = load_manifest(self.build_dir)
        self.assets = Assets.open(self.build_dir, self.manifest)
        trt = self.backend in ("tensorrt", "tensorrt-rtx")
        self.memory = (memory or DeviceMemoryPool(device or "cuda")) if trt else None
        self._overrides = dict(sessions or {})
        self._open_args = dict(manifest=self.manifest, device=device, memory=self.memory,
                               verify_sha256=verify_sha256, threads=threads, trust_programs=trust_programs)
        self.unet = self.open(self.unet_component)
        self.controlnet = self.open("controlnet") if self.uses_controlnet else None
        self.vae_decoder = self.open("vae_decoder")
        self.device = self.unet.device
        self.max_text_tokens, dynamic_text = text_capacity(self.unet)
        self.prompts = prompt_encoder(self.assets, self.open, self.device, PROMPT_CACHE_SIZE, self.max_text_tokens,
                                      self._text_hint(dynamic_text))
        self.text_encoder, self.text_encoder_2 = (*self.prompts.encoders, None)[:2]  # SD1.5: no text_encoder_2
        self.scheduler_config = self.assets.scheduler_config()
        self.vae_scaling_factor = self.assets.vae_scaling_factor
        self.latent_factor = int(self.assets.value("vae_scale_factor", 8))
        self.latent_channels = int(self.assets.value("latent_channels", 4))
        self.loop = DenoiseLoop(self.unet, self.controlnet, loop_mode)
        self.controlnets = build_controlnets(self.manifest)  # extra ControlNets {name: component}, opened when used
        self._loops: dict[tuple[str, ...], DenoiseLoop] = {(): self.loop}
        self._extra_sessions: dict[str, Session] = {}  # the extra ControlNets opened so far
        # (min, max) of the UNet's `sample` (rows, 4, h, w) where an engine serves it; ONNX Runtime: any size
        self.size_limits = self.assets.engine_range(self.unet_component) if trt else None
        self._constants: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple[str, int], object] = {}

    @classmethod
    def from_build(cls, build_dir: str | os.PathLike, backend: str = "onnxruntime", **kwargs):
        """Open every session of the pipeline from `build_dir` (see DESIGN.md's build layout).

        backend: 'onnxruntime' | 'tensorrt' | 'tensorrt-rtx' | 'torch' (the build's torch.export programs, on
        cuda when present; the face models stay on ONNX Runtime). kwargs: device, loop_mode ('auto' |
        'graph' | 'step-graphs' | 'eager'), verify_sha256 (hash ONNX files / plans / programs against the
        manifest; default True), trust_programs (torch backend: True to load the build's torch.export
        programs, which unpickle and so can run code; refused otherwise), threads (ONNX Runtime),
        sessions (component ->
        Session used instead of the backend's, e.g. a TorchSession, or another pipeline's to share it),
        memory (a DeviceMemoryPool shared with other pipelines; attach all before capturing graphs), and
        per pipeline extras
        (InstantID: face_analyzer).
        """
        return cls(build_dir, backend, **kwargs)

    def open(self, component: str) -> Session:
        """The session of one component of the build, with this pipeline's backend and memory pool."""
        if component in self._overrides:
            return self._overrides[component]
        return open_session(self.build_dir, component, self.backend, **self._open_args)

    def save_runtime_caches(self) -> None:
        """TensorRT-RTX: store the kernels JIT-compiled so far beside each plan, for a faster next start."""
        for session in [*vars(self).values(), *self._extra_sessions.values()]:
            getattr(session, "save_runtime_cache", lambda: None)()

    # -- conditioning ------------------------------------------------------------------------
    def _text_hint(self, dynamic: bool) -> str:
        """How to serve longer prompts with this build (the truncation warning's last words)."""
        if not dynamic:
            return (f"this build's UNet predates the dynamic text axis: re-export it (python -m export.build --model "
                    f"{self.manifest.model} --out {self.build_dir}) to take prompts of up to 3 chunks, or more with "
                    "python -m engine ... --text-tokens")
        return (f"rebuild the UNet engine with a longer text axis: python -m engine {self.build_dir} --components "
                f"{self.unet_component} --text-tokens 77:77:{{needed}} --force (ONNX Runtime and torch take "
                "the default engine profile's 231)")

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_tokens (1, 77·k, C1+C2), pooled text_embeds (1, P); (1, 0) for SD1.5) for one prompt, k its
        chunks (runtime.text); LRU-cached."""
        return self.prompts(prompt)

    def _prompt_rows(self, prompt, negative_prompt, num_images: int):
        """(tokens, pooled, negative tokens, negative pooled), each num_images rows; negative_prompt=None is
        the model's default negative (SDXL: zeros, SD1.5: the empty prompt)."""
        negatives = None if negative_prompt is None else _per_image(negative_prompt, num_images, "negative_prompt")
        return self.prompts.rows(_per_image(prompt, num_images, "prompt"), negatives)

    def cached_constant(self, name: str, compute) -> torch.Tensor:
        """An input-independent tensor: from memory, else assets/<name>, else compute() once."""
        value = self._constants.get(name)
        if value is None:
            value = self.assets.constant(name)
            value = compute() if value is None else value
            value = value.to(self.device).clone()  # TensorRT outputs are reused buffers
            self._constants[name] = value
        return value

    def ip_scale_tensor(self, ip_scale: float | Sequence[float] | BlockScales) -> torch.Tensor:
        """λ as the UNet's ip_scale input (L,) float32: one value for every layer, one per layer, or per block
        (`runtime.ip_scales.BlockScales` over the build's cross-attention layer names)."""
        layers = self.unet.input("ip_scale").shape[0]
        if isinstance(ip_scale, BlockScales):
            names = self.assets.cross_attention_layers()
            if len(names) != layers:
                raise ValueError(f"the build's model facts name {len(names)} cross-attention layers but its UNet takes "
                                 f"{layers} ip_scale values: re-export the build")
            ip_scale = ip_scale.layer_scales(names)
        if isinstance(ip_scale, (int, float)):
            return torch.full((layers,), float(ip_scale), dtype=torch.float32, device=self.device)
        values = torch.as_tensor([float(s) for s in ip_scale], dtype=torch.float32, device=self.device)
        if values.shape != (layers,):
            raise ValueError(f"ip_scale has {values.numel()} values but the UNet has {layers} cross-attention "
                             "layers: pass one float or one value per layer")
        return values

    def plan(self, scheduler: str, steps: int):
        """The scheduler's per-step device tables for `steps` steps, cached per (scheduler, steps)."""
        key = (scheduler, steps)
        if key not in self._plans:
            self._plans[key] = build_scheduler(self.scheduler_config, scheduler).plan(steps, self.device)
        return self._plans[key]

    # -- geometry ----------------------------------------------------------------------------
    def check_size(self, height: int, width: int, rows: int) -> None:
        """ResolutionError unless H x W (pixels) and the UNet's rows fit this build (`size_limits`)."""
        if height <= 0 or width <= 0 or height % PIXEL_MULTIPLE or width % PIXEL_MULTIPLE:
            raise ResolutionError(f"{width}x{height} is not a multiple of {PIXEL_MULTIPLE} px on both sides: "
                                  f"round the size, e.g. to {round_size(width)}x{round_size(height)}")
        if self.size_limits is None:
            return
        (rows_lo, _, h_lo, w_lo), (rows_hi, _, h_hi, w_hi) = self.size_limits
        f = self.latent_factor
        if not (h_lo * f <= height <= h_hi * f and w_lo * f <= width <= w_hi * f):
            raise ResolutionError(
                f"{width}x{height} is outside the engine profile of {self.unet_component}: width {w_lo * f}.."
                f"{w_hi * f}, height {h_lo * f}..{h_hi * f} px. Use a size inside it, or rebuild the engines with "
                f"a wider Geometry (engine/profiles.py): python -m export.build --model {self.manifest.model} "
                f"--stage engines --out {self.build_dir}")
        if not rows_lo <= rows <= rows_hi:
            raise ResolutionError(f"{rows} UNet rows (num_images, x2 with guidance > 1) are outside the engine "
                                  f"profile {rows_lo}..{rows_hi}: lower num_images or rebuild with a larger batch")

    # -- the loop and decoding ---------------------------------------------------------------
    def max_images(self, settings: LoopSettings) -> int | None:
        """How many images one loop call can carry at these settings (the engine profile's rows, halved
        with CFG); None when unbounded (ONNX Runtime)."""
        if self.size_limits is None:
            return None
        rows_hi = self.size_limits[1][0]
        return rows_hi // 2 if settings.guidance > 1.0 else rows_hi

    def run(self, requests: Sequence[Prepared], decode: bool = True,
            should_stop: Callable[[], bool] | None = None, progress: Progress | None = None
            ) -> list[Generation | NonFiniteError]:
        """Several prepared requests with equal `settings` through ONE denoising loop, their rows stacked.

        Each request keeps its own prompt, image tokens, control image and seed (its noise is drawn from
        its own generator, as a lone call draws it), so its images equal those of a call of its own up to
        floating-point summation order. Returns, per request in order, its Generation or the
        NonFiniteError that is its own (a NaN in one request does not fail the others). Raises
        ValueError when the settings differ, ResolutionError when the stack does not fit the engine.
        should_stop: asked between denoising steps (`DenoiseLoop.run`) and before decoding; once it
        returns True the call raises `runtime.loop.DenoiseCancelled` (a server's request nobody waits for).
        progress: called with (steps done, steps) as the loop goes (`DenoiseLoop.run`), e.g. a progress bar.
        """
        if not requests:
            return []
        settings = requests[0].settings
        if any(r.settings != settings for r in requests):
            shared = ", ".join(name for name, _ in settings.values)
            raise ValueError(f"requests in one loop call must share size, {shared} "
                             f"(got {sorted({str(r.settings) for r in requests})}): run them separately")
        num_images = sum(r.num_images for r in requests)
        cfg = settings.guidance > 1.0
        rows = 2 * num_images if cfg else num_images
        height, width = settings.height, settings.width
        self.check_size(height, width, rows)

        def stack(name: str) -> torch.Tensor:
            return torch.cat([getattr(r, name).to(self.device) for r in requests])

        text_tokens, text_embeds, ip_tokens = stack("tokens"), stack("pooled"), stack("image_tokens")
        if cfg:  # CFG rows [every negative, every positive], as the baseline's chunk(2) expects
            text_tokens = torch.cat([stack("negative_tokens"), text_tokens])
            text_embeds = torch.cat([stack("negative_pooled"), text_embeds])
            ip_tokens = torch.cat([stack("negative_image_tokens"), ip_tokens])
        unet_feeds = unet_conditioning(self.unet, text_tokens, ip_tokens, self.ip_scale_tensor(settings.ip_scale),
                                       text_embeds, height, width)
        controlnet_feeds, extras = None, tuple(c[0] for c in requests[0].controls)
        if self.controlnet is not None:
            control = torch.cat([r.control_image.to(self.device).expand(r.num_images, -1, -1, -1) for r in requests])
            controlnet_feeds = {"face_tokens": ip_tokens, "control_image": torch.cat([control, control]) if cfg
                                else control, "text_embeds": text_embeds, "time_ids": unet_feeds["time_ids"],
                                "conditioning_scale": torch.tensor([float(settings.controlnet_scale)],
                                                                   device=self.device)}
        elif not extras:
            unet_feeds.update(zero_residuals(self.unet, rows, height // self.latent_factor, width // self.latent_factor))
        if extras:
            controlnet_feeds = {**(controlnet_feeds or {"text_embeds": text_embeds, "time_ids": unet_feeds["time_ids"]}),
                                **stacked_control_feeds(requests, text_tokens, cfg, self.device)}
        plan = self.plan(settings.scheduler, settings.steps)
        latent_shape = (self.latent_channels, height // self.latent_factor, width // self.latent_factor)
        noise = [draw_noise(plan, (r.num_images, *latent_shape), torch.Generator("cpu").manual_seed(r.seed))
                 for r in requests]
        latents = torch.cat([n[0] for n in noise])
        step_noise = None if noise[0][1] is None else torch.cat([n[1] for n in noise], dim=1)
        window = None  # the ControlNets' steps (InstantID's control_guidance_start / _end)
        if controlnet_feeds is not None and hasattr(settings, "control_guidance_end"):
            window = control_window(settings.steps, settings.control_guidance_start, settings.control_guidance_end)
        inputs = LoopInputs(latents.to(self.device), None if step_noise is None else step_noise.to(self.device),
                            torch.tensor(float(settings.guidance), dtype=torch.float32, device=self.device),
                            unet_feeds, controlnet_feeds, window)
        latents = self._loop_for(extras).run(plan, inputs, should_stop, progress)
        if should_stop is not None and should_stop():
            raise DenoiseCancelled("cancelled after the loop, before decoding: nobody waits for these images")
        results: list[Generation | NonFiniteError] = []
        for request, block in zip(requests, latents.split([r.num_images for r in requests])):
            if not bool(torch.isfinite(block).all()):
                results.append(NonFiniteError(
                    f"the denoising loop produced NaN/Inf latents ({self.unet_component}, {self.backend}): an fp16 "
                    "overflow or a broken engine. Try guidance <= 10, rebuild with --precision fp32, or run the "
                    "baseline to compare"))
                continue
            try:
                results.append(Generation(self.decode(block) if decode else [], block, list(request.warnings)))
            except NonFiniteError as error:
                results.append(error)
        return results

    def _run_one(self, request: Prepared, decode: bool = True, progress: Progress | None = None) -> Generation:
        """One prepared request through the loop; raises its NonFiniteError."""
        result = self.run([request], decode, progress=progress)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _loop_for(self, extras: tuple[str, ...]) -> DenoiseLoop:
        """The loop over the UNet and the ControlNets of these extra components (one per set; graphs cached
        per loop): the IdentityNet's (if any) residuals summed with theirs (runtime.controlnets.MultiControlNet)."""
        if extras not in self._loops:
            for component in extras:
                if component not in self._extra_sessions:
                    self._extra_sessions[component] = self.open(component)
            sessions = [self._extra_sessions[component] for component in extras]
            self._loops[extras] = DenoiseLoop(self.unet, MultiControlNet(self.controlnet, sessions), self.loop.mode)
        return self._loops[extras]

    def request(self, request_or_image=None, prompt: str | None = None, negative_prompt: str | None = None,
                **fields) -> GenerateRequest:
        """This pipeline's request: the one given, or one built from the keyword form (image, prompt,
        negative_prompt, **fields: see `request_type`); RequestError names a field out of bounds."""
        return as_request(self.request_type, request_or_image, prompt, negative_prompt, fields)

    def _prepared(self, request: GenerateRequest, tokens: torch.Tensor, negative_tokens: torch.Tensor,
                  height: int, width: int, control_image=None) -> Prepared:
        """A Prepared from image tokens (1|N, K, C), the request's prompts and the output size H x W px. Its
        settings carry the text length (`text_tokens`): requests whose prompts take different numbers of
        chunks do not share a loop (padding a prompt with empty chunks would change its images)."""
        if isinstance(request.ip_scale, BlockScales):  # its blocks are this UNet's: the request's error, not its loop's
            try:
                self.ip_scale_tensor(request.ip_scale)
            except (BlockScaleError, AssetError) as error:
                raise ValueError(str(error)) from None
        text = self._prompt_rows(request.prompt, request.negative_prompt, request.num_images)
        batch = _repeat_to(request.num_images)
        controls = prepare_controls(request, self.controlnets, self.build_dir, height, width)
        settings = loop_settings(request, height, width)
        settings = replace(settings, values=(*settings.values, ("text_tokens", int(text[0].shape[1]))))
        return Prepared(request, settings, *text, batch(tokens), batch(negative_tokens), control_image,
                        controls=controls, warnings=self._prompt_warnings(request))

    def _prompt_warnings(self, request: GenerateRequest) -> list[str]:
        """The truncation warnings of the request's prompts (PromptEncoder.warnings), each once."""
        def listed(value):
            return None if value is None else [value] if isinstance(value, str) else list(value)

        return self.prompts.warnings(listed(request.prompt), listed(request.negative_prompt))

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 4, h, w) -> B PIL RGB images, as the baseline's decode; NonFiniteError on NaN."""
        image = self.vae_decoder.run({"latents": latents.float() / self.vae_scaling_factor})["image"].float()
        if not bool(torch.isfinite(image).all()):
            raise NonFiniteError("the VAE decoder produced NaN/Inf: an fp16 VAE overflows on SDXL latents; "
                                 "export the VAE in fp32 or use the fp16-fix VAE (--vae-fp16-fix)")
        pixels = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in (pixels * 255).round().astype(np.uint8)]


def _per_image(value: str | Sequence[str], num_images: int, what: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    if len(values) not in (1, num_images):
        raise ValueError(f"{what} has {len(values)} entries: give one, or one per image ({num_images})")
    return values * (num_images // len(values))


def _repeat_to(num_images: int):
    def batch(x: torch.Tensor) -> torch.Tensor:  # (1|N, ...) -> (N, ...), as the baseline repeats rows
        return x.repeat_interleave(num_images // x.shape[0], dim=0) if x.shape[0] != num_images else x
    return batch


def _output(generation: Generation, return_latents: bool):
    return generation if return_latents else generation.images
