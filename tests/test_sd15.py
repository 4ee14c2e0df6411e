"""SD1.5 + IP-Adapter (plain and Plus): the tiny-sd15 files in the real formats, their export, the PyTorch
baseline and the runtime against diffusers' own StableDiffusionPipeline + load_ip_adapter on the same
files (fp32, CPU), and the TensorRT-RTX build of every SD1.5 component on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from export.checkpoint_dims import count_cross_attn_layers
from export.specs import SD15, TINY_SD15

STEPS = 3
ADAPTER_FILES = {False: "ip-adapter_sd15.safetensors", True: "ip-adapter-plus_sd15.safetensors"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def diffusers_sd15_pipeline(weights: Path, weight_name: str, scheduler_config: dict, ip_scale: float):
    """diffusers' StableDiffusionPipeline + load_ip_adapter on the tiny-sd15 files, Euler from `scheduler_config`,
    λ = ip_scale."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from export import loaders

    text = loaders.load_text_stack(TINY_SD15, weights)
    pipe = StableDiffusionPipeline(
        vae=loaders.load_vae(TINY_SD15, weights), text_encoder=text.text_encoder, tokenizer=text.tokenizer,
        unet=loaders.load_unet(TINY_SD15, weights), scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(weights / "IP-Adapter"), subfolder="models", weight_name=weight_name,
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(ip_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sd15_weights(tmp_path_factory) -> Path:
    """The tiny SD1.5 model in the real checkpoint formats (export.tiny)."""
    from export.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny_sd15_weights"), spec=TINY_SD15)


@pytest.fixture(scope="module")
def tiny_sd15_build(tiny_sd15_weights, tmp_path_factory) -> Path:
    """`python -m export.build --model tiny-sd15 --stage onnx`: every pipeline of the family (both
    IP-Adapters), fp32 (the tiny models' default)."""
    from export.build import main

    out = tmp_path_factory.mktemp("tiny_sd15_build")
    assert main(["--model", "tiny-sd15", "--weights", str(tiny_sd15_weights), "--stage", "onnx", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference_image() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((160, 160))


def test_sd15_spec_is_sd15_with_its_22m_adapter():
    """16 cross-attention layers (the adapter's odd keys 1..31); plain adapter = 22.3M parameters."""
    from diffusers import UNet2DConditionModel

    from export.adapters import ImageProj, cross_attention_layers

    assert count_cross_attn_layers(SD15.unet) == count_cross_attn_layers(TINY_SD15.unet) == 16
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15.unet)
        projector = ImageProj(SD15.ip_image_proj)
    widths = [unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
              for name in cross_attention_layers(unet)]
    kv = sum(2 * width * SD15.cross_attention_dim for width in widths)
    total = kv + sum(p.numel() for p in projector.parameters())
    print(f"SD1.5 IP-Adapter: {kv / 1e6:.2f}M K/V + projector = {total / 1e6:.2f}M parameters")
    assert 22.0e6 < total < 22.5e6
    assert SD15.text_encoders == ("text_encoder",) and not SD15.added_conditioning


def test_tiny_sd15_files_are_sd15_adapters(tiny_sd15_weights):
    from export.checkpoint_dims import tensor_shapes

    for plus, name in ((False, "ip-adapter_sd15.safetensors"), (True, "ip-adapter-plus_sd15.safetensors")):
        shapes = tensor_shapes(tiny_sd15_weights / "IP-Adapter" / "models" / name)
        layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("ip_adapter.")})
        assert layers == list(range(1, 32, 2))
        assert ("image_proj.latents" in shapes) == plus and ("image_proj.proj.weight" in shapes) != plus
    assert not (tiny_sd15_weights / "stable-diffusion-v1-5" / "text_encoder_2").exists()


def test_instantid_is_refused_for_sd15(capsys):
    from export.build import parse_args
    from export.sources import UnsupportedComponent, pipeline_components

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "sd15", "--pipeline", "instantid", "--random-init"])
    assert exit_info.value.code == 2
    assert "--model sd15 has no instantid pipeline: choose --pipeline ip-adapter | ip-adapter-plus or all" in \
        capsys.readouterr().err
    assert parse_args(["--model", "sd15", "--random-init"]).pipelines == ("ip-adapter", "ip-adapter-plus")

    with pytest.raises(UnsupportedComponent, match="sd15 has no instantid pipeline.*--pipeline ip-adapter"):
        pipeline_components(SD15, "instantid")
    assert pipeline_components(SD15, "ip-adapter-plus") == ["text_encoder", "image_encoder", "image_proj_plus",
                                                            "unet_ip_adapter_plus", "vae_decoder"]


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_sd15_baseline_equals_diffusers_pipeline(tiny_sd15_weights, reference_image, plus):
    from benchmarks.pipelines import IPAdapterBaseline

    baseline = IPAdapterBaseline("tiny-sd15", plus=plus, weights_dir=tiny_sd15_weights)
    kwargs = dict(steps=STEPS, guidance=5.0, ip_scale=0.6, seed=7, width=128, height=128, num_images=2)
    for negative in (None, "blurry"):
        ours = baseline(reference_image, "a portrait, oil painting", negative_prompt=negative, decode=False, **kwargs)
        pipe = diffusers_sd15_pipeline(tiny_sd15_weights, ADAPTER_FILES[plus], baseline.scheduler_config, 0.6)
        want = pipe("a portrait, oil painting", negative_prompt=negative, ip_adapter_image=reference_image,
                    num_inference_steps=STEPS, guidance_scale=5.0, height=128, width=128, num_images_per_prompt=2,
                    generator=torch.Generator().manual_seed(7), output_type="latent").images
        error = rel(ours.latents, want)
        print(f"baseline vs diffusers, {'plus' if plus else 'plain'}, negative {negative!r}: latents rel {error:.1e}")
        assert ours.latents.shape == (2, 4, 16, 16)
        assert error < 1e-5


def test_tiny_sd15_export_is_sd15_shaped(tiny_sd15_build, tiny_sd15_weights):
    """One text encoder whose ONNX output is the last hidden state; a UNet without text_embeds / time_ids."""
    import numpy as np
    import onnxruntime as ort

    from engine.manifest import load_manifest
    from export import loaders

    manifest = load_manifest(tiny_sd15_build)
    assert "text_encoder_2" not in manifest.components and manifest.metadata["force_zeros_for_empty_prompt"] is False
    assert not (tiny_sd15_build / "assets" / "tokenizer_2").exists()
    assert manifest.metadata["pipelines"] == {
        "ip_adapter": ["text_encoder", "image_encoder", "image_proj", "unet_ip_adapter", "vae_decoder"],
        "ip_adapter_plus": ["text_encoder", "image_encoder", "image_proj_plus", "unet_ip_adapter_plus", "vae_decoder"]}
    for name in ("unet_ip_adapter", "unet_ip_adapter_plus"):
        inputs = {t.name: t for t in manifest.components[name].onnx.inputs}
        assert "text_embeds" not in inputs and "time_ids" not in inputs
        assert tuple(inputs["ip_scale"].shape) == (16,)
        assert len([n for n in inputs if n.startswith("down_residual_")]) == 12
    session = ort.InferenceSession(str(tiny_sd15_build / "onnx" / "text_encoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    stack = loaders.load_text_stack(TINY_SD15, tiny_sd15_weights)
    ids = stack.tokenizer(["a portrait, oil painting", ""], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    hidden = session.run(["hidden_states"], {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = stack.text_encoder(ids).last_hidden_state.numpy()
    error = float(np.linalg.norm(hidden - want) / np.linalg.norm(want))
    print(f"text_encoder ONNX vs CLIPTextModel last_hidden_state: rel {error:.1e}")
    assert error < 1e-5


@pytest.mark.slow
def test_tiny_sd15_components_build_with_tensorrt_rtx(tiny_sd15_build, tmp_path):
    """Every SD1.5 ONNX builds ahead of time on the CPU, and the builder fuses all 32 UNet attentions."""
    import shutil

    from engine.backend import load_backend
    from engine.build_all import build_all
    from engine.fusion import build_report
    from engine.profiles import Geometry, Range
    from export.sources import model_components

    backend = load_backend("tensorrt-rtx")
    build = tmp_path / "build"
    shutil.copytree(tiny_sd15_build, build)
    names = model_components(TINY_SD15)
    sizes = Range(128, 128, 256)
    results = build_all(build, names, backend, geometry=Geometry(height=sizes, width=sizes), progress=False)
    assert sorted(r.component for r in results) == sorted(names)
    assert all(r.status == "built" and (build / "engines" / f"{r.component}.plan").stat().st_size > 0
               for r in results)
    report = build_report(build / "onnx" / "unet_ip_adapter.onnx", backend, size=128)
    print(report.line())
    assert (report.fused, report.total, report.unfused) == (32, 32, ())  # 16 attn1 + 16 attn2


@pytest.fixture(scope="module")
def diffusers_latents(tiny_sd15_weights, reference_image):
    """diffusers' own StableDiffusionPipeline + load_ip_adapter latents, keyed (plus, negative_prompt)."""
    from export import loaders

    scheduler_config = loaders.load_scheduler_config(TINY_SD15, tiny_sd15_weights)
    cache = {}

    def latents(plus: bool, negative: str | None, num_images: int) -> torch.Tensor:
        key = (plus, negative, num_images)
        if key not in cache:
            pipe = diffusers_sd15_pipeline(tiny_sd15_weights, ADAPTER_FILES[plus], scheduler_config, 0.6)
            cache[key] = pipe("a portrait, oil painting", negative_prompt=negative, ip_adapter_image=reference_image,
                              num_inference_steps=STEPS, guidance_scale=5.0, height=128, width=128,
                              num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(7),
                              output_type="latent").images
        return cache[key]
    return latents


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
@pytest.mark.parametrize("negative,num_images", [(None, 2), ("blurry", 1)])
def test_sd15_runtime_equals_diffusers_pipeline(tiny_sd15_build, reference_image, diffusers_latents, plus, negative,
                                                num_images):
    """The runtime (ONNX Runtime, fp32 tiny-sd15 build) against diffusers on the same files: latents rel <= 1e-5."""
    from runtime.pipelines import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_build(tiny_sd15_build, "onnxruntime", plus=plus)
    assert pipe.text_encoder_2 is None and "time_ids" not in pipe.unet.input_names
    result = pipe(reference_image, "a portrait, oil painting", negative, steps=STEPS, guidance=5.0, ip_scale=0.6,
                  seed=7, width=128, height=128, num_images=num_images, return_latents=True, decode=False)
    want = diffusers_latents(plus, negative, num_images)
    error = rel(result.latents, want)
    print(f"runtime vs diffusers, {'plus' if plus else 'plain'}, negative {negative!r}, x{num_images}: "
          f"latents rel {error:.1e}")
    assert result.latents.shape == want.shape == (num_images, 4, 16, 16)
    assert error <= 1e-5


@pytest.mark.slow
def test_sd15_build_is_served(tiny_sd15_build, reference_image, tmp_path):
    """`python -m runtime.serve` on the tiny-sd15 build serves both IP-Adapter pipelines (no InstantID), and an
    HTTP answer equals the runtime pipeline's image."""
    import base64
    import io
    import socket
    import subprocess
    import sys

    import httpx
    import numpy as np
    from serve_helpers import wait_process_ready

    from runtime.pipelines import IPAdapterPipeline

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "runtime.serve", "--build", str(tiny_sd15_build), "--port", str(port),
               "--warmup-size", "128", "--threads", "1"]
    buffer = io.BytesIO()
    reference_image.save(buffer, "PNG")
    body = {"prompt": "a portrait", "image": base64.b64encode(buffer.getvalue()).decode(), "steps": 2, "seed": 3}
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=stream,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(url, process, log, 180)
        assert httpx.get(url + "/readyz").json()["pipelines"] == ["ip-adapter", "ip-adapter-plus"]
        response = httpx.post(url + "/v1/ip-adapter-plus", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert httpx.post(url + "/v1/instantid", json=body, timeout=30).status_code == 404
    finally:
        process.terminate()
        process.wait(20)
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    pipe = IPAdapterPipeline.from_build(tiny_sd15_build, "onnxruntime", plus=True, threads=1)
    direct = np.asarray(pipe(reference_image, "a portrait", steps=2, seed=3)[0])
    assert served.shape == direct.shape == (128, 128, 3)  # the build's default resolution
    assert np.abs(served.astype(int) - direct.astype(int)).max() <= 1


@pytest.mark.slow
def test_sd15_benchmark_runs_every_column(tiny_sd15_build, tiny_sd15_weights, tmp_path):
    """`python -m benchmarks.latency` on the tiny-sd15 build: baseline, ONNX Runtime and torch sessions all run,
    and both runtime columns end on the baseline's latents."""
    import json

    from benchmarks.latency import main

    out = tmp_path / "bench"
    assert main(["--build", str(tiny_sd15_build), "--backend", "onnxruntime,torch", "--baseline", "torch",
                 "--pipeline", "ip-adapter", "--weights", str(tiny_sd15_weights), "--steps", "2", "--runs", "1",
                 "--warmup", "0", "--no-plot", "--no-floor", "--threads", "1", "--out", str(out)]) == 0
    backends = {b["name"]: b for b in json.loads((out / "latency.json").read_text())["backends"]}
    assert all(backends[name]["available"] for name in ("baseline", "onnxruntime", "torch")), backends
    for name in ("onnxruntime", "torch"):
        print(f"{name}: latents rel to the baseline {backends[name]['latents_rel_to_baseline']:.1e}")
        assert backends[name]["latents_rel_to_baseline"] <= 1e-5


def test_sd15_flop_counts():
    """The FLOP floor counts SD1.5 as it is: one text encoder, no added conditioning (meta tensors, no weights)."""
    from benchmarks.flops import text_encoding_flops, unet_step_flops
    from export.specs import SDXL

    unet = unet_step_flops(SD15, "ip-adapter", 512, 512, rows=2)
    text = text_encoding_flops(SD15)
    print(f"SD1.5 at 512², CFG: UNet {unet / 1e12:.2f} TFLOP per step; text encoder {text / 1e9:.1f} GFLOP")
    assert 1.5e12 < unet < 1.7e12
    assert text < text_encoding_flops(SDXL) / 5  # CLIP ViT-L alone, without OpenCLIP bigG


def test_server_memory_limit_counts_sd15_attention_at_the_full_latent(tiny_sd15_build):
    """ONNX Runtime's largest attention in SD1.5 is at the full latent (2 tiny heads over (side/8)² tokens):
    the derived max side keeps those scores within the memory given."""
    from runtime.serve.capacity import ATTENTION_PEAK_FACTOR, limits_for

    limits = limits_for(tiny_sd15_build, "onnxruntime", ["ip-adapter"], memory_gb=4.0)
    tokens = (limits.max_side // 8) ** 2
    scores = ATTENTION_PEAK_FACTOR * 2 * 2 * tokens * tokens * 4  # CFG rows x heads x tokens² x fp32
    print(f"tiny-sd15 at 4 GiB: max side {limits.max_side} px, attention {scores / 2**30:.2f} GiB")
    assert scores <= limits.memory_bytes < ATTENTION_PEAK_FACTOR * 2 * 2 * ((limits.max_side + 64) // 8) ** 4 * 4


def test_sd15_long_weighted_prompt_equals_compel(tiny_sd15_build, tiny_sd15_weights):
    """SD1.5's one text encoder takes long weighted prompts as compel does (last hidden state, normalized):
    the runtime's ONNX Runtime encoding of a 3-chunk prompt = compel's on diffusers' encoder."""
    pytest.importorskip("compel", reason="compel (the dev extra) is the oracle")
    from compel import Compel, DownweightMode

    from export import loaders
    from runtime.pipelines import IPAdapterPipeline

    prompt = ("an old (harbor:1.3) town at dusk, boats on the water, [fog] over the hills. " * 10).strip()
    compel_prompt = prompt.replace("(harbor:1.3)", "(harbor)1.3").replace("[fog]", f"(fog){1 / 1.1:.12f}")
    text = loaders.load_text_stack(TINY_SD15, tiny_sd15_weights)
    oracle = Compel(tokenizer=text.tokenizer, text_encoder=text.text_encoder, truncate_long_prompts=False,
                    downweight_mode=DownweightMode.REMOVE)
    with torch.no_grad():
        expected = oracle(compel_prompt)
    tokens, pooled = IPAdapterPipeline.from_build(tiny_sd15_build).prompts(prompt)
    assert tokens.shape == expected.shape and tokens.shape[1] == 3 * 77 and pooled.shape[1] == 0
    assert float((tokens - expected).abs().max()) <= 1e-5
