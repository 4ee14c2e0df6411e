"""The physical floor: FLOPs of every stage for one request shape, and the device's matmul peak.

    python -m benchmarks.flops --model sdxl --pipeline instantid --resolution 1024 --batch 1 --steps 30
    python -m benchmarks.flops --text-chunks 3 --controlnets 1 --control-guidance-end 0.6

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the PyTorch modules of the
baseline (diffusers UNet with decoupled attention on every attn2 layer, ControlNet, VAE decoder,
CLIP text/vision encoders, Resampler / ImageProj), built on the **meta device**: no weights are
allocated, so SDXL scale costs a couple of seconds on a laptop CPU. Only matmul/conv/attention ops
are counted (the counter's registry); normalisations and element-wise work are not, which is the
usual definition of a compute floor.

Stage shapes (B images, H x W pixels, CFG on: 2B rows through the per-step networks):
  text_encoding   both CLIP text encoders on (k, 77) token ids: one prompt of k 77-token chunks
                  (`text_chunks`, long prompts; zero negatives)
  image_tokens    InstantID: Resampler on (1, 1, 512); IP-Adapter: CLIP vision (1, 3, 224, 224)
                  + ImageProj / Resampler (the cached negative is excluded)
  controlnet_step IdentityNet on (2B, 4, H/8, W/8), 16 face tokens, control image (2B, 3, H, W),
                  + each extra ControlNet (`controlnets`: an SDXL ControlNet of the model's config with
                  the 77k text tokens as its context, runtime.controlnets)
  unet_step       UNet on (2B, 4, H/8, W/8) with 77k text + K image tokens (93 for InstantID, k = 1)
  denoise_step    unet_step + controlnet_step
  denoise_loop    steps x unet_step + (steps inside the ControlNets' window) x controlnet_step: the
                  window (control_guidance_start / _end, runtime.control_window) skips them elsewhere
  vae_decode      VAE decoder on (B, 4, H/8, W/8)
  end_to_end      text_encoding + image_tokens + denoise_loop + vae_decode (face analysis: ONNX,
                  not counted)

The floor of a stage is FLOPs / peak, peak = a measured dense matmul rate (fp16 on CUDA, fp32 on
CPU), so `measured / floor` says how far a stage is from compute-bound.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from export.specs import SPECS, ModelSpec, get_spec
from runtime.pipelines import PIPELINE_NAMES as PIPELINES
from runtime.console import run_command
from runtime.control_window import control_window
from runtime.requests import InstantIDRequest, field_default
TEXT_TOKENS = 77


@dataclass
class StageFlops:
    """FLOPs (multiply-add = 2) per stage for one request; see the module docstring for shapes."""

    model: str
    pipeline: str
    resolution: tuple[int, int]  # (height, width) pixels
    batch: int
    steps: int
    flops: dict[str, float]
    controlnet_steps: int = 0  # the steps that run the IdentityNet (its window); 0 without one


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call `fn(*args, **kwargs)` under FlopCounterMode (no grad)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _meta_ip_state(unet) -> dict[str, torch.Tensor]:
    """Weightless `to_k_ip`/`to_v_ip` tensors for every attn2 layer (keys as the checkpoints)."""
    cross = unet.config.cross_attention_dim
    state = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                state[f"{index}.{kind}.weight"] = torch.empty(hidden, cross, device="meta")
    return state


def image_token_count(spec: ModelSpec, pipeline: str) -> int:
    """K image tokens appended to the 77 text tokens: 16 (InstantID, Plus) or 4 (plain IP-Adapter)."""
    if pipeline == "instantid":
        return spec.instantid_resampler.num_queries
    return spec.ip_plus_resampler.num_queries if pipeline == "ip-adapter-plus" else spec.ip_image_proj.num_tokens


def meta_unet(spec: ModelSpec, pipeline: str):
    """The SDXL UNet of `spec` with decoupled attention (K tokens), on the meta device."""
    from diffusers import UNet2DConditionModel

    from export.adapters import attach_ip_adapter

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(spec.unet).eval()
        attach_ip_adapter(unet, _meta_ip_state(unet), image_token_count(spec, pipeline))
    return unet.requires_grad_(False)


def _meta(cls_or_fn, *args):
    with torch.device("meta"):
        return cls_or_fn(*args).eval().requires_grad_(False)


def _randn(*shape) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def unet_step_flops(spec: ModelSpec, pipeline: str, height: int, width: int, rows: int, unet=None,
                    text_chunks: int = 1) -> int:
    """One UNet call on `rows` rows (2B with CFG) at H x W pixels, context 77k + K tokens."""
    unet = unet or meta_unet(spec, pipeline)
    factor, cross = spec.vae_scale_factor, spec.cross_attention_dim
    sample = _randn(rows, unet.config.in_channels, height // factor, width // factor)
    context = _randn(rows, TEXT_TOKENS * text_chunks + image_token_count(spec, pipeline), cross)
    added = _added_cond(spec, rows)
    return count_flops(unet, sample, torch.tensor(500.0, device="meta"), encoder_hidden_states=context,
                       added_cond_kwargs=added)


def _added_cond(spec: ModelSpec, rows: int) -> dict[str, torch.Tensor] | None:
    if not spec.added_conditioning:  # SD1.5
        return None
    pooled = spec.text_encoder_2["projection_dim"]
    return {"text_embeds": _randn(rows, pooled), "time_ids": _randn(rows, 6)}


def controlnet_step_flops(spec: ModelSpec, height: int, width: int, rows: int) -> int:
    """One IdentityNet call: `rows` rows at H x W, the 16 face tokens as its only context."""
    from diffusers import ControlNetModel

    controlnet = _meta(ControlNetModel.from_config, spec.controlnet)
    factor = spec.vae_scale_factor
    sample = _randn(rows, controlnet.config.in_channels, height // factor, width // factor)
    face = _randn(rows, spec.instantid_resampler.num_queries, spec.cross_attention_dim)
    return count_flops(controlnet, sample, torch.tensor(500.0, device="meta"), encoder_hidden_states=face,
                       controlnet_cond=_randn(rows, 3, height, width),
                       conditioning_scale=field_default(InstantIDRequest, "controlnet_scale"),
                       added_cond_kwargs=_added_cond(spec, rows), return_dict=False)


def extra_controlnet_step_flops(spec: ModelSpec, height: int, width: int, rows: int, text_chunks: int = 1) -> int:
    """One extra ControlNet call (a `controlnet_<name>` of the model's ControlNet config): `rows` rows at
    H x W, the 77k text tokens as its context."""
    from diffusers import ControlNetModel

    controlnet = _meta(ControlNetModel.from_config, spec.controlnet)
    factor = spec.vae_scale_factor
    sample = _randn(rows, controlnet.config.in_channels, height // factor, width // factor)
    text = _randn(rows, TEXT_TOKENS * text_chunks, spec.cross_attention_dim)
    return count_flops(controlnet, sample, torch.tensor(500.0, device="meta"), encoder_hidden_states=text,
                       controlnet_cond=_randn(rows, 3, height, width), conditioning_scale=1.0,
                       added_cond_kwargs=_added_cond(spec, rows), return_dict=False)


def vae_decode_flops(spec: ModelSpec, height: int, width: int, batch: int) -> int:
    """VAE decoder on (batch, 4, H/8, W/8) latents."""
    from diffusers import AutoencoderKL

    vae = _meta(AutoencoderKL.from_config, spec.vae)
    factor = spec.vae_scale_factor
    latents = _randn(batch, vae.config.latent_channels, height // factor, width // factor)
    return count_flops(vae.decode, latents, return_dict=False)


def text_encoding_flops(spec: ModelSpec, prompts: int = 1) -> int:
    """The CLIP text encoders (SDXL's two, SD1.5's one) on `prompts` rows of 77 token ids (a long prompt's
    k chunks are k rows)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    encoders = ((CLIPTextModel, spec.text_encoder), (CLIPTextModelWithProjection, spec.text_encoder_2))
    for cls, config in encoders[:len(spec.text_encoders)]:
        encoder = _meta(cls, CLIPTextConfig(**config))
        ids = torch.zeros(prompts, TEXT_TOKENS, dtype=torch.long, device="meta")
        total += count_flops(encoder, ids, output_hidden_states=True)
    return total


def image_tokens_flops(spec: ModelSpec, pipeline: str, images: int = 1) -> int:
    """InstantID: Resampler on (N, 1, 512). IP-Adapter: CLIP vision encoder + ImageProj / Resampler."""
    from export.adapters import ImageProj, Resampler

    if pipeline == "instantid":
        resampler = _meta(Resampler, spec.instantid_resampler)
        return count_flops(resampler, _randn(images, 1, spec.face_embedding_dim))
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = _meta(CLIPVisionModelWithProjection, CLIPVisionConfig(**spec.image_encoder))
    size = spec.image_encoder["image_size"]
    pixels = _randn(images, 3, size, size)
    total = count_flops(encoder, pixels, output_hidden_states=True)
    if pipeline == "ip-adapter-plus":
        config = spec.ip_plus_resampler
        patches = (size // spec.image_encoder["patch_size"]) ** 2 + 1
        return total + count_flops(_meta(Resampler, config), _randn(images, patches, config.embedding_dim))
    config = spec.ip_image_proj
    return total + count_flops(_meta(ImageProj, config), _randn(images, config.embed_dim))


def stage_flops(model: str | ModelSpec, pipeline: str, height: int, width: int, batch: int = 1,
                steps: int = 30, control_guidance_start: float = 0.0, control_guidance_end: float = 1.0, *,
                text_chunks: int = 1, controlnets: int = 0) -> StageFlops:
    """FLOPs of every stage (module docstring) for B images of H x W pixels with CFG, `steps` steps, a
    prompt of `text_chunks` 77-token chunks, the IdentityNet (InstantID) and `controlnets` extra
    ControlNets run on the steps of their window (diffusers' control_guidance_start / _end)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}: choose one of {list(PIPELINES)}")
    if text_chunks < 1 or controlnets < 0:
        raise ValueError(f"text_chunks must be >= 1 and controlnets >= 0, got {text_chunks} and {controlnets}")
    spec = get_spec(model) if isinstance(model, str) else model
    rows = 2 * batch
    flops = {"text_encoding": text_encoding_flops(spec, text_chunks),
             "image_tokens": image_tokens_flops(spec, pipeline)}
    flops["unet_step"] = unet_step_flops(spec, pipeline, height, width, rows, text_chunks=text_chunks)
    identitynet = controlnet_step_flops(spec, height, width, rows) if pipeline == "instantid" else 0
    extra = extra_controlnet_step_flops(spec, height, width, rows, text_chunks) if controlnets else 0
    flops["controlnet_step"] = identitynet + controlnets * extra
    flops["denoise_step"] = flops["unet_step"] + flops["controlnet_step"]
    window = control_window(steps, control_guidance_start, control_guidance_end)
    controlnet_steps = (steps if window is None else sum(window)) if flops["controlnet_step"] else 0
    flops["denoise_loop"] = steps * flops["unet_step"] + controlnet_steps * flops["controlnet_step"]
    flops["vae_decode"] = vae_decode_flops(spec, height, width, batch)
    flops["end_to_end"] = flops["text_encoding"] + flops["image_tokens"] + flops["denoise_loop"] + flops["vae_decode"]
    return StageFlops(spec.name, pipeline, (height, width), batch, steps, {k: float(v) for k, v in flops.items()},
                      controlnet_steps)


@dataclass
class MatmulPeak:
    """A measured dense matmul rate: `flops_per_s` for an n x n x n product in `dtype` on `device`."""

    device: str
    dtype: str
    n: int
    seconds: float
    flops_per_s: float


def measure_matmul_peak(device: str | torch.device | None = None, n: int | None = None,
                        repeats: int = 5) -> MatmulPeak:
    """Median rate of `repeats` n x n @ n x n products: fp16 on CUDA (n 8192), fp32 on CPU (n 1024).

    CUDA is timed with events after a warm-up, the CPU with perf_counter.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up (kernel selection, page faults)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - begin)
    seconds = sorted(times)[len(times) // 2]
    return MatmulPeak(str(device), str(dtype).removeprefix("torch."), n, seconds, 2.0 * n**3 / seconds)


EXAMPLES = """examples:
  python -m benchmarks.flops --model sdxl --pipeline instantid --resolution 1024 --steps 30
  python -m benchmarks.flops --model tiny --resolution 128 --steps 4 --peak     # with this machine's floor
  python -m benchmarks.flops --text-chunks 3 --controlnets 1 --control-guidance-end 0.6  # long prompt, canny
"""


def floor_seconds(flops: dict[str, float], peak_flops_per_s: float) -> dict[str, float]:
    """Seconds per stage if it ran at the matmul peak: FLOPs / peak."""
    return {stage: value / peak_flops_per_s for stage, value in flops.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the FLOPs of every stage (TFLOP) and, with --peak, the floor in seconds, as JSON. A user
    mistake is one `error:` line and status 2 (runtime.console)."""
    return run_command(_main, argv)


def _main(argv: list[str]) -> int:
    from runtime.console import Parser

    parser = Parser(prog="python -m benchmarks.flops", description=__doc__.split("\n")[0], epilog=EXAMPLES)
    parser.add_argument("--model", default="sdxl", choices=tuple(SPECS),
                        help="model architecture (built on the meta device: no weights are needed)")
    parser.add_argument("--pipeline", choices=PIPELINES, default="instantid", help="pipeline whose stages are counted")
    parser.add_argument("--resolution", type=int, default=1024, help="output side in pixels (square)")
    parser.add_argument("--batch", type=int, default=1, help="images per request (CFG doubles the rows)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--text-chunks", type=int, default=1,
                        help="77-token chunks of the prompt (a long prompt: 2 or 3)")
    parser.add_argument("--controlnets", type=int, default=0,
                        help="extra ControlNets beside the IdentityNet (python -m export.build --controlnet)")
    parser.add_argument("--control-guidance-start", type=float, default=0.0,
                        help="ControlNets' step window start (fraction of the steps)")
    parser.add_argument("--control-guidance-end", type=float, default=1.0,
                        help="ControlNets' step window end (fraction of the steps)")
    parser.add_argument("--peak", action="store_true", help="also measure this device's matmul peak")
    args = parser.parse_args(argv)
    counted = stage_flops(args.model, args.pipeline, args.resolution, args.resolution, args.batch, args.steps,
                          args.control_guidance_start, args.control_guidance_end, text_chunks=args.text_chunks,
                          controlnets=args.controlnets)
    out = {**asdict(counted), "tflops": {k: v / 1e12 for k, v in counted.flops.items()}}
    if args.peak:
        peak = measure_matmul_peak()
        out["peak"] = asdict(peak)
        out["floor_s"] = floor_seconds(counted.flops, peak.flops_per_s)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
