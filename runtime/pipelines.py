"""InstantID and IP-Adapter (plain / Plus) on SDXL, served from a build directory's sessions.

    pipe = InstantIDPipeline.from_build("build/tiny", backend="onnxruntime")
    images = pipe("photo.jpg", "a portrait, oil painting", steps=30, seed=0)    # list of PIL images

The data flow is the baseline's (benchmarks/baseline.py, benchmarks/pipelines.py), reproduced
step for step: same preprocessing, CFG rows [negative, positive], `negative_prompt=None` -> zero
text negatives, negative image tokens = projector(zeros) (IP-Adapter Plus: projector(encoder(zero
image))), face tokens as the ControlNet's context, time_ids (H, W, 0, 0, H, W), seeded CPU noise
drawn as diffusers draws it. λ (per layer), the ControlNet scale and the guidance are runtime
inputs: changing them needs no rebuild and no new CUDA graph.

Requests that agree on size, steps, guidance, scales and scheduler can share one loop call, their
rows stacked (what a server's micro-batching does):

    jobs = [pipe.prepare(photo, prompt, seed=s) for photo, prompt, s in requests]   # Prepared each
    results = pipe.run(jobs)     # per request: its Generation, or its own NonFiniteError
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime.assets import Assets
from runtime.clip_image import clip_pixel_values
from runtime.images import ImageSource, load_image
from runtime.loop import DenoiseCancelled, DenoiseLoop, LoopInputs
from runtime.schedulers import build_scheduler, draw_noise
from runtime.sessions import DeviceMemoryPool, Session, normalize_backend, open_session

PROMPT_CACHE_SIZE = 16
PIXEL_MULTIPLE = 64


class ResolutionError(ValueError):
    """The requested image size cannot be served by this build."""


class NonFiniteError(RuntimeError):
    """The pipeline produced NaN or Inf values (raised instead of returning a black image)."""


@dataclass
class Generation:
    """images: B PIL RGB images; latents: (B, 4, H/8, W/8) float32 final latents before decoding."""

    images: list[Image.Image]
    latents: torch.Tensor


@dataclass(frozen=True)
class LoopSettings:
    """What the requests sharing one denoising loop must agree on (output size in pixels, the rest as
    the pipelines' arguments; ip_scale a float or a per-layer tuple)."""

    height: int
    width: int
    steps: int
    guidance: float
    ip_scale: float | tuple[float, ...]
    scheduler: str
    controlnet_scale: float = 0.0

    @classmethod
    def of(cls, height, width, steps, guidance, ip_scale, scheduler, controlnet_scale=0.0) -> LoopSettings:
        scale = float(ip_scale) if isinstance(ip_scale, (int, float)) else tuple(float(s) for s in ip_scale)
        return cls(int(height), int(width), int(steps), float(guidance), scale, str(scheduler), float(controlnet_scale))


@dataclass
class Prepared:
    """One request's conditioning, ready for the loop (the pipelines' `prepare`); N = num_images.

    tokens / negative_tokens: (N, 77, C) text tokens; pooled / negative_pooled: (N, P);
    image_tokens / negative_image_tokens: (N, K, C); control_image: (1, 3, H, W) in [0, 1] (InstantID).
    """

    settings: LoopSettings
    seed: int
    num_images: int
    tokens: torch.Tensor
    pooled: torch.Tensor
    negative_tokens: torch.Tensor
    negative_pooled: torch.Tensor
    image_tokens: torch.Tensor
    negative_image_tokens: torch.Tensor
    control_image: torch.Tensor | None = None


class _SDXLPipeline:
    """Text encoders, UNet (+ ControlNet), VAE decoder sessions, the prompt cache and the loop."""

    unet_component = ""
    uses_controlnet = False

    def __init__(self, build_dir: str | os.PathLike, backend: str = "onnxruntime", *, device=None,
                 loop_mode: str = "auto", verify_sha256: bool = True, threads: int | None = None,
                 sessions: dict[str, Session] | None = None, memory: DeviceMemoryPool | None = None,
                 trust_programs: bool = False):
        from engine.manifest import load_manifest

        self.build_dir = Path(build_dir)
        self.backend = normalize_backend(backend)
        self.manifest = load_manifest(self.build_dir)
        self.assets = Assets.open(self.build_dir, self.manifest)
        trt = self.backend in ("tensorrt", "tensorrt-rtx")
        self.memory = (memory or DeviceMemoryPool(device or "cuda")) if trt else None
        self._overrides = dict(sessions or {})
        self._open_args = dict(manifest=self.manifest, device=device, memory=self.memory,
                               verify_sha256=verify_sha256, threads=threads, trust_programs=trust_programs)
        self.text_encoder = self.open("text_encoder")
        self.text_encoder_2 = self.open("text_encoder_2")
        self.unet = self.open(self.unet_component)
        self.controlnet = self.open("controlnet") if self.uses_controlnet else None
        self.vae_decoder = self.open("vae_decoder")
        self.device = self.unet.device
        self.tokenizer, self.tokenizer_2 = self.assets.tokenizers()
        self.scheduler_config = self.assets.scheduler_config()
        self.vae_scaling_factor = self.assets.vae_scaling_factor
        self.latent_factor = int(self.assets.value("vae_scale_factor", 8))
        self.latent_channels = int(self.assets.value("latent_channels", 4))
        self.loop = DenoiseLoop(self.unet, self.controlnet, loop_mode)
        # (min, max) of the UNet's `sample` (rows, 4, h, w) where an engine serves it; ONNX Runtime: any size
        self.size_limits = self.assets.engine_range(self.unet_component) if trt else None
        self._prompts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
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
        for session in list(vars(self).values()):
            getattr(session, "save_runtime_cache", lambda: None)()

    # -- conditioning ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_tokens (1, 77, C1+C2), pooled text_embeds (1, P)) for one prompt; LRU-cached."""
        cached = self._prompts.get(prompt)
        if cached is None:
            ids = torch.from_numpy(self.tokenizer([prompt]))
            ids_2 = torch.from_numpy(self.tokenizer_2([prompt]))
            hidden = self.text_encoder.run({"input_ids": ids})["hidden_states"]
            out_2 = self.text_encoder_2.run({"input_ids": ids_2})
            cached = (torch.cat([hidden.to(self.device), out_2["hidden_states"].to(self.device)], dim=-1).clone(),
                      out_2["text_embeds"].to(self.device).clone())
            self._prompts[prompt] = cached
            while len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        self._prompts.move_to_end(prompt)
        return cached

    def _prompt_rows(self, prompt, negative_prompt, num_images: int):
        """(tokens, pooled, negative tokens, negative pooled), each num_images rows."""
        prompts = _per_image(prompt, num_images, "prompt")
        encoded = [self.encode_prompt(p) for p in prompts]
        tokens, pooled = torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded])
        if negative_prompt is None:  # SDXL's force_zeros_for_empty_prompt
            return tokens, pooled, torch.zeros_like(tokens), torch.zeros_like(pooled)
        negatives = [self.encode_prompt(p) for p in _per_image(negative_prompt, num_images, "negative_prompt")]
        return tokens, pooled, torch.cat([e[0] for e in negatives]), torch.cat([e[1] for e in negatives])

    def cached_constant(self, name: str, compute) -> torch.Tensor:
        """An input-independent tensor: from memory, else assets/<name>, else compute() once."""
        value = self._constants.get(name)
        if value is None:
            value = self.assets.constant(name)
            value = compute() if value is None else value
            value = value.to(self.device).clone()  # TensorRT outputs are reused buffers
            self._constants[name] = value
        return value

    def ip_scale_tensor(self, ip_scale: float | Sequence[float]) -> torch.Tensor:
        """λ as the UNet's ip_scale input (L,) float32: one value for every layer or one per layer."""
        layers = self.unet.input("ip_scale").shape[0]
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
                                  f"round the size, e.g. to {_round(width)}x{_round(height)}")
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
            should_stop: Callable[[], bool] | None = None) -> list[Generation | NonFiniteError]:
        """Several prepared requests with equal `settings` through ONE denoising loop, their rows stacked.

        Each request keeps its own prompt, image tokens, control image and seed (its noise is drawn from
        its own generator, as a lone call draws it), so its images equal those of a call of its own up to
        floating-point summation order. Returns, per request in order, its Generation or the
        NonFiniteError that is its own (a NaN in one request does not fail the others). Raises
        ValueError when the settings differ, ResolutionError when the stack does not fit the engine.
        should_stop: asked between denoising steps (`DenoiseLoop.run`) and before decoding; once it
        returns True the call raises `runtime.loop.DenoiseCancelled` (a server's request nobody waits for).
        """
        if not requests:
            return []
        settings = requests[0].settings
        if any(r.settings != settings for r in requests):
            raise ValueError("requests in one loop call must share size, steps, guidance, scales and scheduler "
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
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32,
                                device=self.device).repeat(rows, 1)
        unet_feeds = {"text_tokens": text_tokens, "ip_tokens": ip_tokens,
                      "ip_scale": self.ip_scale_tensor(settings.ip_scale), "text_embeds": text_embeds,
                      "time_ids": time_ids}
        controlnet_feeds = None
        if self.controlnet is not None:
            control = torch.cat([r.control_image.to(self.device).expand(r.num_images, -1, -1, -1) for r in requests])
            controlnet_feeds = {"face_tokens": ip_tokens, "control_image": torch.cat([control, control]) if cfg
                                else control, "text_embeds": text_embeds, "time_ids": time_ids,
                                "conditioning_scale": torch.tensor([float(settings.controlnet_scale)],
                                                                   device=self.device)}
        else:
            unet_feeds.update(self._zero_residuals(rows, height, width))
        plan = self.plan(settings.scheduler, settings.steps)
        latent_shape = (self.latent_channels, height // self.latent_factor, width // self.latent_factor)
        noise = [draw_noise(plan, (r.num_images, *latent_shape), torch.Generator("cpu").manual_seed(r.seed))
                 for r in requests]
        latents = torch.cat([n[0] for n in noise])
        step_noise = None if noise[0][1] is None else torch.cat([n[1] for n in noise], dim=1)
        inputs = LoopInputs(latents.to(self.device), None if step_noise is None else step_noise.to(self.device),
                            torch.tensor(float(settings.guidance), dtype=torch.float32, device=self.device),
                            unet_feeds, controlnet_feeds)
        latents = self.loop.run(plan, inputs) if should_stop is None else self.loop.run(plan, inputs, should_stop)
        if should_stop is not None and should_stop():
            raise DenoiseCancelled("cancelled after the loop, before decoding: nobody waits for these images")
        results: list[Generation | NonFiniteError] = []
        for block in latents.split([r.num_images for r in requests]):
            if not bool(torch.isfinite(block).all()):
                results.append(NonFiniteError(
                    f"the denoising loop produced NaN/Inf latents ({self.unet_component}, {self.backend}): an fp16 "
                    "overflow or a broken engine. Try guidance <= 10, rebuild with --precision fp32, or run the "
                    "baseline to compare"))
                continue
            try:
                results.append(Generation(self.decode(block) if decode else [], block))
            except NonFiniteError as error:
                results.append(error)
        return results

    def _run_one(self, request: Prepared, decode: bool = True) -> Generation:
        """One prepared request through the loop; raises its NonFiniteError."""
        result = self.run([request], decode)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _prepared(self, prompt, negative_prompt, tokens: torch.Tensor, negative_tokens: torch.Tensor,
                  settings: LoopSettings, seed: int, num_images: int, control_image=None) -> Prepared:
        """A Prepared from image tokens (1|N, K, C) and prompts (one, or one per image)."""
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        text = self._prompt_rows(prompt, negative_prompt, num_images)
        batch = _repeat_to(num_images)
        return Prepared(settings, int(seed), num_images, *text, batch(tokens), batch(negative_tokens), control_image)

    def _zero_residuals(self, rows: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Zero ControlNet residuals (rows, C, h/2^k, w/2^k) float32 for a UNet served without a ControlNet."""
        from engine.profiles import parse_dim

        def size(dim) -> int:  # axis names per engine/profiles.py, e.g. 'latent_height/2'
            return dim if isinstance(dim, int) else parse_dim(dim).value({"height": height, "width": width}[
                parse_dim(dim).base], dim)

        return {info.name: torch.zeros((rows, *map(size, info.shape[1:])), device=self.device)
                for info in self.unet.inputs if info.name.startswith(("down_residual_", "mid_residual"))}

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


def _round(size: int) -> int:
    return max(PIXEL_MULTIPLE, int(round(size / PIXEL_MULTIPLE)) * PIXEL_MULTIPLE)


def _output(generation: Generation, return_latents: bool):
    return generation if return_latents else generation.images


def control_tensor(kps_image: np.ndarray) -> torch.Tensor:
    """kps image (H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [0, 1], the ControlNet's input."""
    return torch.from_numpy(np.ascontiguousarray(kps_image)).permute(2, 0, 1)[None].float() / 255.0


class InstantIDPipeline(_SDXLPipeline):
    """InstantID: face photo -> identity (ArcFace -> face tokens) + pose (kps -> IdentityNet)."""

    unet_component = "unet_instantid"
    uses_controlnet = True

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

    def prepare_embedding(self, face_embedding, kps_image: np.ndarray, prompt, negative_prompt=None,
                          steps: int = 30, guidance: float = 5.0, ip_scale=0.8, controlnet_scale: float = 0.8,
                          seed: int = 0, num_images: int = 1, scheduler: str = "euler") -> Prepared:
        """The loop's conditioning from a face embedding (512,) and a kps image (H, W, 3) uint8 (output H x W)."""
        height, width = kps_image.shape[:2]
        tokens, negative_tokens = self.face_tokens(face_embedding)
        settings = LoopSettings.of(height, width, steps, guidance, ip_scale, scheduler, controlnet_scale)
        return self._prepared(prompt, negative_prompt, tokens, negative_tokens, settings, seed, num_images,
                              control_tensor(kps_image))

    def prepare(self, image: ImageSource, prompt, negative_prompt=None, steps: int = 30, guidance: float = 5.0,
                ip_scale=0.8, controlnet_scale: float = 0.8, seed: int = 0, width: int | None = None,
                height: int | None = None, pose_image: ImageSource | None = None, num_images: int = 1,
                scheduler: str = "euler", face_index: int | None = None) -> Prepared:
        """`__call__`'s work before the loop: face analysis, face tokens, kps image, prompts (see `run`)."""
        resolution = int(self.assets.value("default_resolution", 1024))
        face, kps_image = face_conditioning(self.face_analyzer, image, pose_image, width, height, resolution,
                                            face_index)
        return self.prepare_embedding(face.embedding, kps_image, prompt, negative_prompt, steps=steps,
                                      guidance=guidance, ip_scale=ip_scale, controlnet_scale=controlnet_scale,
                                      seed=seed, num_images=num_images, scheduler=scheduler)

    def generate(self, face_embedding, kps_image: np.ndarray, prompt, negative_prompt=None, steps: int = 30,
                 guidance: float = 5.0, ip_scale=0.8, controlnet_scale: float = 0.8, seed: int = 0,
                 num_images: int = 1, scheduler: str = "euler", decode: bool = True) -> Generation:
        """From a face embedding (512,) and a kps image (H, W, 3) uint8; output H x W (the baseline's generate)."""
        return self._run_one(self.prepare_embedding(
            face_embedding, kps_image, prompt, negative_prompt, steps=steps, guidance=guidance, ip_scale=ip_scale,
            controlnet_scale=controlnet_scale, seed=seed, num_images=num_images, scheduler=scheduler), decode)

    def __call__(self, image: ImageSource, prompt, negative_prompt=None, steps: int = 30, guidance: float = 5.0,
                 ip_scale=0.8, controlnet_scale: float = 0.8, seed: int = 0, width: int | None = None,
                 height: int | None = None, pose_image: ImageSource | None = None, num_images: int = 1,
                 scheduler: str = "euler", face_index: int | None = None, return_latents: bool = False):
        """Identity from `image`, pose (kps) from `pose_image` or `image` -> list of PIL images.

        Faces are found as the reference finds them, whatever the output size (`face_conditioning`);
        the output is width x height, or without them the pose photo's InstantID size at the model's
        resolution (SDXL: infer.py's). Raises NoFaceError when a photo has no face, ImageError for
        a photo too elongated, ResolutionError for a size the build cannot serve, NonFiniteError on NaN.
        With return_latents=True returns a Generation (images and final latents).
        """
        generation = self._run_one(self.prepare(
            image, prompt, negative_prompt, steps=steps, guidance=guidance, ip_scale=ip_scale,
            controlnet_scale=controlnet_scale, seed=seed, width=width, height=height, pose_image=pose_image,
            num_images=num_images, scheduler=scheduler, face_index=face_index))
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


class IPAdapterPipeline(_SDXLPipeline):
    """IP-Adapter SDXL: reference image -> CLIP image encoder -> ImageProj (4 tokens) or Resampler (Plus, 16)."""

    def __init__(self, build_dir, backend="onnxruntime", *, plus: bool = False, **kwargs):
        self.plus = plus
        self.unet_component = "unet_ip_adapter_plus" if plus else "unet_ip_adapter"
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

    def prepare(self, image: ImageSource, prompt, negative_prompt=None, steps: int = 30, guidance: float = 5.0,
                ip_scale=0.6, seed: int = 0, width: int | None = None, height: int | None = None,
                num_images: int = 1, scheduler: str = "euler") -> Prepared:
        """`__call__`'s work before the loop: image tokens and prompts (see `run`)."""
        size = int(self.assets.value("default_resolution", 1024))
        tokens, negative_tokens = self.image_tokens(image)
        settings = LoopSettings.of(height or size, width or size, steps, guidance, ip_scale, scheduler)
        return self._prepared(prompt, negative_prompt, tokens, negative_tokens, settings, seed, num_images)

    def __call__(self, image: ImageSource, prompt, negative_prompt=None, steps: int = 30, guidance: float = 5.0,
                 ip_scale=0.6, seed: int = 0, width: int | None = None, height: int | None = None,
                 num_images: int = 1, scheduler: str = "euler", return_latents: bool = False, decode: bool = True):
        """`num_images` images (width x height, default the build's resolution) prompted by `image`.

        Returns a list of PIL images (a Generation with the latents when return_latents=True).
        """
        generation = self._run_one(self.prepare(image, prompt, negative_prompt, steps=steps, guidance=guidance,
                                                ip_scale=ip_scale, seed=seed, width=width, height=height,
                                                num_images=num_images, scheduler=scheduler), decode)
        return _output(generation, return_latents)
