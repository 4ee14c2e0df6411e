"""Extra ControlNets beside the IdentityNet (export/controlnets.py, runtime/controlnets.py): a tiny SDXL
canny ControlNet in diffusers' format is exported with `--controlnet canny=DIR` into a copy of the tiny
build, and the runtime (ONNX Runtime, fp32) is checked against diffusers' own
StableDiffusionXLControlNetPipeline on the same files: InstantID + canny through a MultiControlNetModel,
IP-Adapter + canny through load_ip_adapter. Also: the graph paths over a TensorRT/CUDA double, the host
canny bit for bit, a TensorRT-RTX build on the CPU, and one clear error per bad input (Python, CLI, HTTP)."""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_tiny import run_export_cli
from runtime.controlnets import Control, MultiControlNet, canny_map, control_feeds, control_tensor_of

REPO = Path(__file__).resolve().parents[1]
STEPS, SEED, HEIGHT, WIDTH = 3, 5, 128, 192
PROMPT = "a portrait, oil painting"
KPS = np.array([[80.0, 50.0], [115.0, 52.0], [97.0, 72.0], [82.0, 95.0], [112.0, 96.0]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8


@pytest.fixture(scope="module")
def build(tiny_build, tmp_path_factory) -> Path:
    """A copy of the tiny fp32 build plus `controlnet_canny`, exported by the real CLI from a tiny SDXL
    ControlNet written in diffusers' folder format (export.controlnets.write_tiny_controlnet)."""
    from export.controlnets import write_tiny_controlnet

    out = tmp_path_factory.mktemp("multi_controlnet") / "build"
    shutil.copytree(tiny_build, out, ignore=shutil.ignore_patterns("engines", "torch"))
    canny = write_tiny_controlnet(out / "weights" / "controlnet-canny-tiny")
    run_export_cli(["--model", "tiny", "--weights", str(out / "weights"), "--stage", "onnx", "--precision", "fp32",
                    "--out", str(out), "--controlnet", f"canny={canny}", "--components", "controlnet_canny"])
    return out


class FaceContextControlNet(torch.nn.Module):
    """InstantID's IdentityNet inside diffusers' MultiControlNetModel: MultiControlNetModel hands every
    ControlNet the prompt embeddings as context; InstantID's pipeline hands the IdentityNet the face tokens
    instead. This wrapper does only that swap (face_tokens: the CFG rows [Resampler(0), Resampler(face)]),
    so diffusers' own loop, guidance, control image processing and residual summation run."""

    def __init__(self, controlnet: torch.nn.Module, face_tokens: torch.Tensor):
        super().__init__()
        self.controlnet, self.face_tokens = controlnet, face_tokens

    @property
    def config(self):
        return self.controlnet.config

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        return self.controlnet(sample, timestep, encoder_hidden_states=self.face_tokens, **kwargs)


def _canny_pil(photo: np.ndarray, low: int = 100, high: int = 200) -> Image.Image:
    """The canny control image as diffusers' ControlNet examples make it (cv2.Canny, 3 channels)."""
    import cv2

    return Image.fromarray(np.concatenate([cv2.Canny(photo, low, high)[:, :, None]] * 3, axis=2))


@pytest.mark.parametrize("window", [(0.0, 1.0), (0.0, 0.6)], ids=["every-step", "window"])
def test_instantid_with_canny_equals_diffusers_multicontrolnet(build, photo, window):
    """InstantID + canny (runtime, ONNX Runtime) vs StableDiffusionXLControlNetPipeline with
    MultiControlNetModel([IdentityNet on face tokens, canny]) and the face tokens through the UNet's
    decoupled attention (diffusers' IP-Adapter path): latents rel <= 1e-5. The request's ControlNet window
    (control_guidance_start / _end) holds for every ControlNet, as diffusers applies one window to all."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    from benchmarks.baseline import make_scheduler, set_ip_scale
    from benchmarks.pipelines import InstantIDBaseline
    from runtime.face import draw_kps
    from runtime.pipelines import InstantIDPipeline

    embedding = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    kps_image = draw_kps(WIDTH, HEIGHT, KPS)
    pipe = InstantIDPipeline.from_build(build, "onnxruntime", threads=1)
    fields = dict(steps=STEPS, seed=SEED, guidance=5.0, ip_scale=0.8, controlnet_scale=0.8,
                  control_guidance_start=window[0], control_guidance_end=window[1])
    got = pipe.generate(embedding, kps_image, PROMPT, decode=False, **fields,
                        controls=[Control("canny", photo, scale=0.5, preprocess="canny")]).latents
    alone = pipe.generate(embedding, kps_image, PROMPT, decode=False, **fields).latents

    base = InstantIDBaseline("tiny", weights_dir=build / "weights", device="cpu", dtype=torch.float32)
    set_ip_scale(base.ip_layers, 0.8)
    embeds = torch.stack([torch.zeros(512), torch.from_numpy(embedding)]).reshape(2, 1, 1, 512)  # [negative, face]
    with torch.no_grad():
        face_tokens = base.resampler(embeds[:, 0])
    base.unet.encoder_hid_proj = MultiIPAdapterImageProjection([base.resampler])  # as load_ip_adapter sets it
    base.unet.config.encoder_hid_dim_type = "ip_image_proj"
    canny_net = ControlNetModel.from_pretrained(build / "weights" / "controlnet-canny-tiny")
    reference = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text.text_encoder, text_encoder_2=base.text.text_encoder_2,
        tokenizer=base.text.tokenizer, tokenizer_2=base.text.tokenizer_2, unet=base.unet,
        controlnet=MultiControlNetModel([FaceContextControlNet(base.controlnet, face_tokens), canny_net]),
        scheduler=make_scheduler(base.scheduler_config, "euler"), add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    want = reference(PROMPT, image=[Image.fromarray(kps_image), _canny_pil(photo)],
                     controlnet_conditioning_scale=[0.8, 0.5], num_inference_steps=STEPS, guidance_scale=5.0,
                     height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(SEED),
                     control_guidance_start=window[0], control_guidance_end=window[1],
                     ip_adapter_image_embeds=[embeds], output_type="latent").images
    error, effect = rel(got, want), rel(alone, want)
    print(f"InstantID + canny vs diffusers MultiControlNet, window {window}: latents rel {error:.1e} (without "
          f"canny: {effect:.1e})")
    assert got.shape == want.shape == (1, 4, HEIGHT // 8, WIDTH // 8)
    assert error <= 1e-5 and effect > 1e-3  # equal, and the canny ControlNet did change the result


def test_ip_adapter_with_canny_equals_diffusers_controlnet_pipeline(build, photo):
    """IP-Adapter + a canny map given as the control image (resized by the runtime as diffusers' processor
    resizes it) vs StableDiffusionXLControlNetPipeline + load_ip_adapter on the same files: rel <= 1e-5."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from benchmarks.baseline import make_scheduler
    from export import loaders
    from export.specs import TINY
    from runtime.pipelines import IPAdapterPipeline

    weights, control_map = build / "weights", np.asarray(_canny_pil(photo))
    reference_image = Image.fromarray(photo).resize((160, 160))
    pipe = IPAdapterPipeline.from_build(build, "onnxruntime", threads=1)
    got = pipe(reference_image, PROMPT, steps=STEPS, seed=SEED, guidance=5.0, ip_scale=0.6, width=WIDTH,
               height=HEIGHT, controls=[Control("canny", control_map, scale=0.7)], return_latents=True,
               decode=False).latents

    text = loaders.load_text_stack(TINY, weights)
    reference = StableDiffusionXLControlNetPipeline(
        vae=loaders.load_vae(TINY, weights), text_encoder=text.text_encoder, text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer, tokenizer_2=text.tokenizer_2, unet=loaders.load_unet(TINY, weights),
        controlnet=ControlNetModel.from_pretrained(weights / "controlnet-canny-tiny"),
        scheduler=make_scheduler(loaders.load_scheduler_config(TINY, weights), "euler"), add_watermarker=False)
    reference.load_ip_adapter(str(weights / "IP-Adapter"), subfolder="sdxl_models",
                              weight_name="ip-adapter_sdxl_vit-h.safetensors", image_encoder_folder="models/image_encoder")
    reference.set_ip_adapter_scale(0.6)
    reference.set_progress_bar_config(disable=True)
    want = reference(PROMPT, image=Image.fromarray(control_map), controlnet_conditioning_scale=0.7,
                     ip_adapter_image=reference_image, num_inference_steps=STEPS, guidance_scale=5.0, height=HEIGHT,
                     width=WIDTH, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    error = rel(got, want)
    print(f"IP-Adapter + canny vs diffusers ControlNet pipeline + load_ip_adapter: latents rel {error:.1e}")
    assert got.shape == want.shape and error <= 1e-5


def test_a_long_prompt_reaches_the_extra_controlnets(build, photo):
    """A prompt of two 77-token chunks: the extra ControlNet takes the same (2B, 154, C) text tokens as the UNet
    (the shared dynamic text axis), and its residuals still change the result."""
    from runtime.pipelines import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_build(build, "onnxruntime", threads=1)
    assert pipe.open("controlnet_canny").input("text_tokens").shape[1] == pipe.unet.input("text_tokens").shape[1]
    prompt = ", ".join(["a portrait of an astronaut in a white suit"] * 12)  # > 75 tokens: two chunks
    fields = dict(steps=2, seed=SEED, width=128, height=128, return_latents=True, decode=False)
    prepared = pipe.prepare(photo, prompt, controls=[Control("canny", photo, scale=0.7, preprocess="canny")], steps=2,
                            width=128, height=128)
    assert prepared.tokens.shape[1] == 154
    got = pipe.run([prepared], decode=False)[0].latents
    plain = pipe(photo, prompt, **fields).latents
    assert torch.isfinite(got).all() and rel(got, plain) > 1e-3


@pytest.mark.parametrize("low,high,size", [(100, 200, (HEIGHT, WIDTH)), (50, 120, (512, 512)), (150, 250, (320, 192))])
def test_host_canny_is_cv2_canny_through_diffusers_control_processor(photo, low, high, size):
    """The control tensor of preprocess='canny' equals cv2.Canny + diffusers' ControlNet image processor
    (VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess at H x W), bit for bit."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    height, width = size
    want = processor.preprocess(_canny_pil(photo, low, high), height=height, width=width)
    got = control_tensor_of(Control("canny", photo, preprocess="canny", low=low, high=high), height, width)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert np.array_equal(canny_map(photo, low, high), np.asarray(_canny_pil(photo, low, high)))


# ---- graph paths: the sum is bound as the UNet's residual inputs (TensorRT/CUDA double) ---------------

def _canny_residuals(f):
    base = (0.2 * f["sample"] - f["text_tokens"].mean((1, 2))[:, None, None, None]
            + 2.0 * f["control_image"].mean((1, 2, 3))[:, None, None, None])
    scale = f["conditioning_scale"]
    return {"down_residual_0": base * scale, "mid_residual": (base.mean(1, keepdim=True) - f["timestep"] / 500) * scale}


def _canny_engine_spec():
    from test_trt_contract import F16, F32, _common, _latent

    from tests.trt_double import EngineSpec

    latent = lambda channels: lambda s: (s["sample"][0], channels, *s["sample"][2:])  # noqa: E731
    return EngineSpec(
        inputs={"sample": (F16, *_latent(4)), "timestep": (F32, (1,), (1,)), "text_tokens": (F16, (1, 7, 5), (4, 7, 5)),
                "control_image": (F16, (1, 3, 32, 32), (4, 3, 256, 256)), **_common(),
                "conditioning_scale": (F32, (1,), (1,))},
        outputs={"down_residual_0": (F16, latent(4)), "mid_residual": (F16, latent(1))},
        compute=_canny_residuals, scratch=12288)


def _world_with_canny():
    from test_trt_contract import World

    from tests.trt_double import EngineDouble

    world = World()
    world.canny_engine = EngineDouble(world.trt, world.cuda, _canny_engine_spec())
    world.canny = world.session(world.canny_engine, "controlnet_canny")
    latent = ("2B", None, "latent_height", "latent_width")  # the axis names zero residuals are sized by
    world.unet.inputs = tuple(replace(i, shape=tuple(d if n is None else n for d, n in zip(i.shape, latent)))
                              if i.name.endswith("_residual_0") or i.name == "mid_residual" else i
                              for i in world.unet.inputs)
    return world


@pytest.mark.parametrize("identitynet,window", [(True, None), (False, None), (True, (False, True, True)),
                                               (True, (True, False, True))],
                         ids=["instantid", "ip-adapter", "instantid-window", "instantid-gap"])
@pytest.mark.parametrize("mode", ["graph", "step-graphs"])
def test_graph_paths_sum_into_the_unets_residual_buffers(identitynet, window, mode):
    """Whole-loop and per-step graphs over MultiControlNet equal the eager loop exactly, on a strict double of
    TensorRT and CUDA (aligned bindings, one context per graph, an enqueue before capture), replaying new
    control images and scales; the canny ControlNet changes the result."""
    from test_trt_contract import loop_inputs

    from runtime.loop import DenoiseLoop

    world, reference = _world_with_canny(), _world_with_canny()
    graphs = DenoiseLoop(world.unet, MultiControlNet(world.controlnet if identitynet else None, [world.canny]), mode)
    eager = DenoiseLoop(reference.unet, MultiControlNet(reference.controlnet if identitynet else None,
                                                        [reference.canny]), "eager")
    without = DenoiseLoop(reference.unet, reference.controlnet if identitynet else None, "eager")
    for seed, scale in ((3, 0.6), (4, 1.3), (3, 0.6)):
        plan, plain = loop_inputs("euler", 3, 1, 8, seed)
        image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        extra = control_feeds(["controlnet_canny"], [image], [scale], plain.unet_feeds["text_tokens"])
        shared = {k: plain.controlnet_feeds[k] for k in ("text_embeds", "time_ids")}
        inputs = replace(plain, controlnet_feeds={**(plain.controlnet_feeds if identitynet else shared), **extra},
                         controlnet_steps=window)  # off the window no ControlNet runs, the UNet reads zeros
        if not identitynet:  # IP-Adapter: no IdentityNet; without the canny ControlNet the residuals are zeros
            shapes = {"down_residual_0": (2, 4, 8, 8), "mid_residual": (2, 1, 8, 8)}
            plain = replace(plain, unet_feeds={**plain.unet_feeds, **{k: torch.zeros(s) for k, s in shapes.items()}},
                            controlnet_feeds=None)
        latents = graphs.run(plan, inputs)
        assert graphs.last_path == mode
        torch.testing.assert_close(latents, eager.run(plan, inputs), rtol=0, atol=0)
        assert rel(latents, without.run(plan, plain)) > 1e-3
    assert len(world.cuda.graphs) == (1 if mode == "graph" else 3)  # captured once, replayed
    engines = (world.unet_engine, world.controlnet_engine, world.canny_engine)
    assert all(not context.errors for engine in engines for context in engine.contexts)


# ---- TensorRT-RTX ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_extra_controlnet_builds_with_tensorrt_rtx(build, tmp_path):
    """controlnet_canny builds ahead of time on the CPU (TensorRT-RTX), as a loop engine (user allocation)."""
    from engine.backend import load_backend
    from engine.build_all import build_all
    from engine.manifest import load_manifest
    from engine.profiles import Geometry, Range

    copy = tmp_path / "build"
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("weights"))
    sizes = Range(128, 128, 256)
    start = time.perf_counter()
    [result] = build_all(copy, ["controlnet_canny"], load_backend("tensorrt-rtx"),
                         geometry=Geometry(height=sizes, width=sizes), progress=False)
    print(f"controlnet_canny: TensorRT-RTX build {time.perf_counter() - start:.1f} s on the CPU, plan "
          f"{result.plan_bytes / 1e6:.1f} MB")
    assert result.status == "built" and (copy / "engines" / "controlnet_canny.plan").stat().st_size > 0
    engine = load_manifest(copy).components["controlnet_canny"].engine
    assert [t.name for t in engine.inputs][:3] == ["sample", "timestep", "text_tokens"]


# ---- bad inputs: one clear error each --------------------------------------------------------------

def test_bad_controls_in_python(build, tiny_build, photo, tmp_path):
    from runtime.images import ImageError
    from runtime.pipelines import IPAdapterPipeline
    from runtime.requests import IPAdapterRequest, RequestError

    pipe = IPAdapterPipeline.from_build(build, "onnxruntime", threads=1)
    with pytest.raises(ValueError, match=r"^unknown control 'depth': this build's ControlNets are canny$"):
        pipe.prepare(photo, PROMPT, controls=[Control("depth", photo)], width=128, height=128)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="not an image PIL can read"):
        pipe.prepare(photo, PROMPT, controls=[Control("canny", bad, preprocess="canny")], width=128, height=128)
    plain = IPAdapterPipeline.from_build(tiny_build, "onnxruntime", threads=1)
    with pytest.raises(ValueError, match="has no extra ControlNets.*--controlnet NAME=PATH"):
        plain.prepare(photo, PROMPT, controls=[Control("canny", photo)], width=128, height=128)
    with pytest.raises(RequestError, match="controls: each ControlNet can be given once per request"):
        IPAdapterRequest(photo, PROMPT, controls=[{"name": "canny", "image": photo}, Control("canny", photo)])
    with pytest.raises(RequestError, match="preprocess must be one of none, canny"):
        IPAdapterRequest(photo, PROMPT, controls=[{"name": "canny", "image": photo, "preprocess": "sobel"}])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_bad_controls_on_the_cli(build, tiny_build, tmp_path, capsys):
    """`python -m runtime generate` (its main, in-process): each mistake is one `error:` line and status 2; a good
    --control writes the image."""
    from skimage import data

    from runtime.__main__ import main

    photo, bad = tmp_path / "photo.png", tmp_path / "bad.png"
    Image.fromarray(data.astronaut()).save(photo)
    bad.write_text("not an image")
    common = ["--pipeline", "ip-adapter", "--image", str(photo), "--prompt", PROMPT, "--width", "128", "--height",
              "128", "--steps", "2", "--out", str(tmp_path / "out.png")]
    cases = {
        (str(build), f"depth={photo}"): "error: unknown control 'depth': this build's ControlNets are canny",
        (str(tiny_build), f"canny={photo}"): f"error: {tiny_build} has no extra ControlNets",
        (str(build), f"canny={bad}:0.5"): f"error: {bad} is not an image PIL can read",
        (str(build), "canny"): "error: argument --controls/--control: --control canny: give NAME=PATH",
    }
    for (where, control), message in cases.items():
        status = main(["generate", "--build", where, *common, "--control", control])
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and lines and lines[-1].startswith(message), lines
    assert main(["generate", "--build", str(build), *common, "--control", f"canny={photo}:0.5:canny/80/160"]) == 0
    assert Image.open(tmp_path / "out.png").size == (128, 128)


@pytest.mark.slow
def test_controls_over_http(build, photo, tmp_path):
    """`python -m runtime.serve` on the build: JSON and multipart controls generate what the runtime does;
    unknown name, a build's missing image part, an unreadable image: 422 with the message."""
    import httpx

    from runtime.pipelines import IPAdapterPipeline
    from serve_helpers import wait_process_ready

    buffer = io.BytesIO()
    Image.fromarray(photo).resize((160, 160)).save(buffer, "PNG")
    png = buffer.getvalue()
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "runtime.serve", "--build", str(build), "--port", str(port), "--threads", "1",
               "--warmup-size", "128", "--pipelines", "ip-adapter", "--max-batch", "1"]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1/ip-adapter"
    try:
        wait_process_ready(f"http://127.0.0.1:{port}", process, log, 180)
        schema = httpx.get(f"http://127.0.0.1:{port}/v1/schema", timeout=30).json()
        assert schema["pipelines"]["ip-adapter"]["controlnets"] == ["canny"]  # what `controls` may name
        body = {"prompt": PROMPT, "image": base64.b64encode(png).decode(), "width": 128, "height": 128, "steps": 2,
                "seed": 4}
        control = {"name": "canny", "image": base64.b64encode(png).decode(), "scale": 0.6, "preprocess": "canny"}
        response = httpx.post(url, json={**body, "controls": [control]}, timeout=120)
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(io.BytesIO(response.content)))
        pipe = IPAdapterPipeline.from_build(build, "onnxruntime", threads=1)
        direct = pipe(png, PROMPT, width=128, height=128, steps=2, seed=4,
                      controls=[Control("canny", png, scale=0.6, preprocess="canny")])[0]
        assert np.abs(served.astype(int) - np.asarray(direct).astype(int)).max() <= 1
        form = {k: str(v) for k, v in body.items() if k != "image"}
        form["controls"] = '[{"name": "canny", "image": "@edges", "scale": 0.6, "preprocess": "canny"}]'
        response = httpx.post(url, data=form, files={"image": ("p.png", png, "image/png"),
                                                     "edges": ("e.png", png, "image/png")}, timeout=120)
        assert response.status_code == 200, response.text
        assert np.abs(np.asarray(Image.open(io.BytesIO(response.content))).astype(int) - served.astype(int)).max() <= 1
        bad_cases = [
            ({"controls": [{**control, "name": "depth"}]}, "unknown control 'depth': this build's ControlNets are canny"),
            ({"controls": [{**control, "image": base64.b64encode(b"not an image").decode()}]},
             "controls[0].image: the image data is not an image PIL can read"),
            ({"controls": [{"name": "canny", "scale": 0.5}]}, "controls[0].image: Field required"),
        ]
        for extra, message in bad_cases:
            response = httpx.post(url, json={**body, **extra}, timeout=120)
            assert response.status_code == 422 and response.json()["error"]["message"].startswith(message), \
                response.text
    finally:
        process.terminate()
        process.wait(20)
