"""The stages the harness times, for the PyTorch baseline and for the runtime, as zero-argument calls.

Every runner turns a `Workload` (pipeline, H x W pixels, B images, N steps) into
`{stage: fn}`; the same inputs go to every backend (a seeded face embedding and a kps image for
InstantID, a reference image for IP-Adapter, one prompt with zero negatives, CFG on):

  face_analysis    detector + ArcFace on a photo (ONNX Runtime; the same code and models for the
                   baseline and the runtime: the baseline's face path is the runtime's FaceAnalyzer)
  text_encoding    both text encoders on one prompt (a fresh prompt per call: the runtime's
                   prompt cache never hits)
  image_tokens     InstantID: Resampler(embedding); IP-Adapter: CLIP image encoder + projector
  denoise_step     one ControlNet + UNet call on the 2B CFG rows (model work of one step)
  denoise_loop     the N-step loop from ready conditioning: scheduler, noise, CFG, steps
  vae_decode       VAE decoder + postprocessing to PIL images (the last denoise_loop's latents)
  end_to_end       conditioning + loop + decode from the embedding/kps image (or reference image)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.pipelines import PIPELINES, pipeline_entry
from runtime.requests import GenerateRequest, InstantIDRequest, field_default

STAGES = ("face_analysis", "text_encoding", "image_tokens", "denoise_step", "denoise_loop", "vae_decode",
          "end_to_end")
# InstantID kps (5, 2) as fractions of (width, height): eyes, nose, mouth corners
KPS_FRACTIONS = np.array([[0.36, 0.40], [0.64, 0.40], [0.50, 0.55], [0.39, 0.72], [0.61, 0.72]], np.float32)


@dataclass
class Workload:
    """One request shape and its inputs (identical for every backend); every other setting is the
    pipeline's request default (runtime/requests.py)."""

    pipeline: str  # a name of runtime.pipelines.PIPELINES
    height: int
    width: int
    batch: int
    steps: int
    guidance: float = 5.0
    seed: int = 0
    prompt: str = "a portrait photo of a person, studio light"
    embedding: np.ndarray = field(default_factory=lambda: np.random.default_rng(0).standard_normal(512)
                                  .astype(np.float32) * 20)
    _counter: itertools.count = field(default_factory=itertools.count, repr=False)

    @property
    def face(self) -> bool:
        """The pipeline works from a face (InstantID: embedding and kps image) rather than a reference image."""
        return pipeline_entry(self.pipeline).face

    def request(self, image=None, prompt: str | None = None) -> GenerateRequest:
        """The pipeline's request for this workload (`image`: the reference image, None for a face pipeline)."""
        request_type = pipeline_entry(self.pipeline).request_type
        return request_type(image, prompt or self.prompt, steps=self.steps, guidance=self.guidance, seed=self.seed,
                            num_images=self.batch, width=self.width, height=self.height)

    def kps_image(self) -> np.ndarray:
        """The control image (H, W, 3) uint8 for fixed keypoints."""
        from runtime.face import draw_kps

        return draw_kps(self.width, self.height, KPS_FRACTIONS * np.array([self.width, self.height], np.float32))

    def fresh_prompt(self) -> str:
        """The prompt with a new suffix (defeats prompt caches; same token count work)."""
        return f"{self.prompt}, take {next(self._counter)}"


def photo() -> np.ndarray | None:
    """scikit-image's astronaut (512, 512, 3) uint8 RGB (one face), or None without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        return None
    return data.astronaut()


def reference_image() -> np.ndarray:
    """The IP-Adapter reference image: the astronaut, or a seeded noise image (256, 256, 3) uint8."""
    image = photo()
    return image if image is not None else np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)


def face_analysis_fn(analyzer, image: np.ndarray | None):
    """upload + detect + embed on `image` (RGB) with a FaceAnalyzer (fixed kps when the detector finds no face)."""
    if analyzer is None or image is None:
        return None
    fixed = KPS_FRACTIONS * np.array([image.shape[1], image.shape[0]], np.float32)

    def run():
        uploaded = analyzer.upload(image)
        faces = analyzer.detector.detect(uploaded)
        kps = max(faces, key=lambda face: face.area).kps if faces else fixed
        return analyzer.recognizer.embed_faces(uploaded, [kps])[0]
    return run


class _Runner:
    """What both runners share: `pipe` (face_tokens / image_tokens), the last loop's latents."""

    pipe = None
    latents: torch.Tensor | None = None

    def _last_latents(self) -> torch.Tensor:
        if self.latents is None:
            raise RuntimeError("vae_decode needs the latents of a denoise_loop run, and none succeeded")
        return self.latents

    def _tokens(self, work: Workload, image):
        return self.pipe.face_tokens(work.embedding) if work.face else self.pipe.image_tokens(image)


class BaselineRunner(_Runner):
    """The PyTorch baseline (benchmarks.pipelines) behind the stage interface."""

    name = "baseline"

    def __init__(self, pipeline: str, model: str, weights: Path | None, device=None, dtype=None, analyzer=None):
        from benchmarks.pipelines import open_baseline

        random_init = weights is None
        self.pipe = open_baseline(pipeline, model, weights_dir=weights, random_init=random_init, device=device,
                                  dtype=dtype)
        self.device = torch.device(self.pipe.device)
        self.analyzer = analyzer
        self.notes = [f"diffusers modules, {self.pipe.dtype} on {self.device}, weights "
                      f"{'random (seeded)' if random_init else weights}"]
        self.latents: torch.Tensor | None = None

    def stages(self, work: Workload) -> dict:
        """{stage: zero-argument call} for `work`."""
        pipe, instantid = self.pipe, work.face
        image = None if instantid else reference_image()
        kps_image = work.kps_image() if instantid else None
        request = work.request(image)
        tokens, negative_tokens = self._tokens(work, image)
        embeds, pooled, negative_embeds, negative_pooled = pipe.encode_prompt(work.prompt, None)
        loop_kwargs = dict(prompt_embeds=embeds, pooled=pooled, negative_embeds=negative_embeds,
                           negative_pooled=negative_pooled, tokens=tokens, negative_tokens=negative_tokens,
                           height=work.height, width=work.width, num_images=work.batch, steps=request.steps,
                           guidance=request.guidance, ip_scale=request.ip_scale, seed=request.seed,
                           scheduler=request.scheduler)
        if instantid:
            from benchmarks.pipelines import control_tensor

            loop_kwargs.update(controlnet=pipe.controlnet, control_image=control_tensor(kps_image),
                               controlnet_scale=request.controlnet_scale)

        def loop():
            self.latents = pipe.denoise(**loop_kwargs)
            return self.latents

        return {"face_analysis": face_analysis_fn(self.analyzer, photo()) if instantid else None,
                "text_encoding": lambda: pipe.encode_prompt(work.fresh_prompt(), None),
                "image_tokens": lambda: self._tokens(work, image),
                "denoise_step": self._step_fn(work, loop_kwargs),
                "denoise_loop": loop,
                "vae_decode": lambda: pipe.decode(self._last_latents()),
                "end_to_end": lambda: end_to_end(pipe, work, image, kps_image)}

    def _step_fn(self, work: Workload, kw: dict):
        """One ControlNet + UNet call on the 2B CFG rows, with the loop's conditioning."""
        pipe, rows = self.pipe, 2 * work.batch
        factor = pipe.spec.vae_scale_factor

        def rep(x):
            return x.repeat(rows // x.shape[0], *([1] * (x.ndim - 1)))

        face = rep(kw["tokens"])
        context = (rep(kw["prompt_embeds"]), [face])  # diffusers' IP-Adapter form, as the loop passes it
        added = None if kw["pooled"] is None else {  # SD1.5: no added conditioning
            "text_embeds": rep(kw["pooled"]), "time_ids": pipe.time_ids(work.height, work.width, rows)}
        sample = torch.randn(rows, pipe.unet.config.in_channels, work.height // factor, work.width // factor,
                             generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.dtype)
        timestep = torch.tensor(500.0, device=pipe.device)
        controlnet = kw.get("controlnet")
        control = rep(kw["control_image"].to(pipe.device, pipe.dtype)) if controlnet is not None else None

        @torch.no_grad()
        def step():
            residuals = {}
            if controlnet is not None:
                down, mid = controlnet(sample, timestep, encoder_hidden_states=face, controlnet_cond=control,
                                       conditioning_scale=kw["controlnet_scale"], added_cond_kwargs=added,
                                       return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            return pipe.unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added,
                             return_dict=False, **residuals)[0]
        return step


def session_feeds(session, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random inputs for every input of a runtime Session, shapes from its named axes.

    sizes: {'batch': B, 'height': H, 'width': W} pixels (axis names follow engine/profiles.py), optionally
    'text_tokens' (default one prompt chunk, 77). Floats ~N(0, 1) (timestep 500, the scales at InstantID's
    request defaults), integers zero.
    """
    from engine.profiles import TEXT_CHUNK, TEXT_TOKENS_AXIS, parse_dim

    sizes = {TEXT_TOKENS_AXIS: TEXT_CHUNK, **sizes}

    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for info in session.inputs:
        dims = []
        for dim in info.shape:
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, str):
                expr = parse_dim(dim)
                dims.append(expr.value(sizes[expr.base], dim))
            else:
                raise ValueError(f"{session.name} input '{info.name}' has an unnamed dynamic axis {info.shape}: "
                                 "cannot size it for the step benchmark")
        if info.dtype.is_floating_point:
            value = {"timestep": 500.0, "ip_scale": field_default(InstantIDRequest, "ip_scale"),
                     "conditioning_scale": field_default(InstantIDRequest, "controlnet_scale")}.get(info.name)
            tensor = (torch.full(dims, value) if value is not None else torch.randn(dims, generator=generator))
        else:
            tensor = torch.zeros(dims, dtype=info.dtype)
        feeds[info.name] = tensor.to(session.device)
    return feeds


def end_to_end(pipe, work: Workload, image, kps_image):
    """One whole request from ready inputs (InstantID: embedding + kps image; IP-Adapter: the reference
    image) through a baseline or runtime pipeline; returns its images."""
    if work.face:  # the output size is the kps image's
        out = pipe.generate(work.embedding, kps_image, work.request(None, work.fresh_prompt()))
    else:
        out = pipe(work.request(image, work.fresh_prompt()))
    return getattr(out, "images", out)  # the baselines return a Result, the runtime's __call__ a list


class RuntimeRunner(_Runner):
    """The lean runtime (runtime.pipelines) of one backend behind the stage interface.

    The loop is timed through the pipelines' `run([prepared], decode=False)` (from ready conditioning);
    one step through the UNet/ControlNet sessions themselves.
    """

    def __init__(self, pipeline: str, build: Path, backend: str, device=None, loop_mode: str = "auto",
                 threads: int | None = None, model: str = "tiny", weights: Path | None = None, dtype=None,
                 trust_programs: bool = False):
        kwargs = dict(loop_mode=loop_mode, trust_programs=trust_programs)
        programs = backend == "torch" and has_torch_programs(build, pipeline)
        if device is not None and (backend != "torch" or programs):
            kwargs["device"] = device
        if threads is not None:
            kwargs["threads"] = threads
        self.name = backend
        self.notes: list[str] = []
        if programs:  # the runtime's own torch backend: the build's torch.export programs
            self.notes.append("the build's torch.export programs (--stage torch)")
        elif backend == "torch":  # the runtime's loop over torch modules with the engines' I/O
            kwargs["sessions"] = torch_sessions(pipeline, model, weights, device, dtype)
            backend = "onnxruntime"  # only for components without a torch session (face models)
            self.notes.append(f"TorchSessions (export.components wrappers), weights "
                              f"{'random (seeded)' if weights is None else weights}")
        self.pipe = PIPELINES[pipeline].open(build, backend, **kwargs)
        self.device = torch.device(self.pipe.device)
        self.latents: torch.Tensor | None = None

    @property
    def analyzer(self):
        """The build's FaceAnalyzer (ONNX Runtime), or None when the build has no face models."""
        try:
            return self.pipe.face_analyzer
        except (AttributeError, FileNotFoundError):
            return None

    def stages(self, work: Workload) -> dict:
        """{stage: zero-argument call} for `work`."""
        pipe, instantid = self.pipe, work.face
        image = None if instantid else reference_image()
        kps_image = work.kps_image() if instantid else None
        if instantid:  # conditioning ready before the clock starts: the loop alone is timed
            prepared = pipe.prepare_embedding(work.embedding, kps_image, work.request())
        else:
            prepared = pipe.prepare(work.request(image))

        def loop():
            self.latents = pipe.run([prepared], decode=False)[0].latents
            path = getattr(pipe.loop, "last_path", None)
            if path and f"loop path: {path}" not in self.notes:
                self.notes.append(f"loop path: {path}")
            return self.latents

        return {"face_analysis": face_analysis_fn(self.analyzer, photo()) if instantid else None,
                "text_encoding": lambda: pipe.encode_prompt(work.fresh_prompt()),
                "image_tokens": lambda: self._tokens(work, image),
                "denoise_step": self._step_fn(work),
                "denoise_loop": loop,
                "vae_decode": lambda: pipe.decode(self._last_latents()),
                "end_to_end": lambda: end_to_end(pipe, work, image, kps_image)}

    def _step_fn(self, work: Workload):
        """ControlNet (if any) + UNet session calls with random inputs of the step's shapes."""
        sizes = {"batch": work.batch, "height": work.height, "width": work.width}
        unet_feeds = session_feeds(self.pipe.unet, sizes)
        controlnet = self.pipe.controlnet
        control_feeds = session_feeds(controlnet, sizes) if controlnet is not None else None

        def step():
            feeds = dict(unet_feeds)
            if controlnet is not None:
                feeds.update(controlnet.run(control_feeds))
            return self.pipe.unet.run(feeds)
        return step


def has_torch_programs(build: Path, pipeline: str) -> bool:
    """True when the build holds torch.export programs of every model component of `pipeline`."""
    from engine.manifest import load_manifest

    metadata = load_manifest(build).metadata
    components = metadata.get("pipelines", {}).get(pipeline.replace("-", "_"), [])
    programs = metadata.get("torch_programs", {})
    return bool(components) and all(c in programs for c in components if c not in ("face_detector", "arcface"))


def torch_sessions(pipeline: str, model: str, weights: Path | None, device=None, dtype=None) -> dict:
    """{component: TorchSession} for every model component of `pipeline` (face models excluded):
    the export.components wrappers (the engines' exact I/O) run by torch on `device` (default cuda
    if present), `dtype` (default fp16 on cuda, fp32 on cpu; the VAE stays fp32)."""
    import tempfile

    from export.sources import Sources, pipeline_components
    from export.specs import get_spec
    from runtime.sessions import TorchSession

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    assets = Path(tempfile.mkdtemp(prefix="bench_torch_assets_"))
    sources = Sources(get_spec(model), weights, weights is None, dtype, assets)
    sessions = {}
    for name in pipeline_components(sources.spec, pipeline):
        if name in ("face_detector", "arcface"):
            continue
        component = sources.make(name)
        module = component.module.to(device)
        sessions[name] = TorchSession(module, component.inputs, component.outputs, name=name, device=device)
    sources.release()
    return sessions


def build_analyzer(build: Path | None):
    """The build's FaceAnalyzer (ONNX Runtime, CPU), or None when there is no build or no face models."""
    if build is None:
        return None
    try:
        from runtime.assets import Assets

        return Assets.open(build).face_analyzer()
    except Exception:
        return None
