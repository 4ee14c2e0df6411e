"""Builds exported with `--lora` against diffusers' own LoRA loading, on the same files.

Two tiny LoRA files cover what published SDXL LoRAs touch: every attention projection of the UNet
(to_q/to_k/to_v/to_out.0 of attn1 and attn2) and of both text encoders (q/k/v/out_proj, plus
mlp fc1/fc2), a feed-forward, a proj_in, a 3x3 and a 1x1 convolution. One is written in the kohya
layout (`lora_unet_…lora_down/lora_up/alpha`, `lora_te1_`, `lora_te2_`); the other by diffusers'
own `StableDiffusionXLPipeline.save_lora_weights`, with peft `LoraConfig` metadata (rank, alpha,
target modules) as diffusers' training scripts write it.

The IP-Adapter build with `--lora FILE:SCALE`, run by the runtime with ONNX Runtime, is compared with
diffusers' `StableDiffusionXLPipeline` + `load_ip_adapter` + `load_lora_weights` on the same tiny
files (needs peft), the scale applied unfused (`cross_attention_kwargs={"scale": …}`, which also
scales the text encoders' LoRA layers) and fused (`fuse_lora(lora_scale=…)`): fp32 latents within
1e-5 relative, the same seeded noise. The few-step recipes of docs/few_step.md run the same way on
the diffusers/PEFT build (the tiny LoRA standing in for an LCM-, Lightning-, Hyper-SD- or TCD-LoRA):
the runtime's scheduler presets against diffusers' scheduler swapped in as the recipes do it, with
guidance 0, 1 (no classifier-free guidance) and 1.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_tiny import diffusers_sdxl_ip_adapter, export_lora_build, module_weight, random_lora_factors, relative_error
from safetensors.torch import save_file

from export.specs import TINY

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the dev extra installs it)")

RANK, ALPHA, SCALE = 4, 3.0, 0.7
SIZE, STEPS, SEED, IP_SCALE, GUIDANCE = 64, 3, 5, 0.6, 5.0
PROMPT, NEGATIVE = "a cup on a table", "blurry"
LATENT_TOL = 1e-5
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_EXTRA = ["down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
              "down_blocks.1.attentions.0.proj_in", "down_blocks.1.resnets.0.conv1",
              "down_blocks.1.resnets.0.conv_shortcut"]
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _modules(weights: Path) -> dict[str, torch.nn.Module]:
    """{'unet', 'text_encoder', 'text_encoder_2'} of the tiny model, freshly loaded."""
    from export import loaders

    text = loaders.load_text_stack(TINY, weights)
    return {"unet": loaders.load_unet(TINY, weights), "text_encoder": text.text_encoder,
            "text_encoder_2": text.text_encoder_2}


def _targets(modules) -> dict[str, list[str]]:
    """Module paths per target, text encoders named 'text_model.…' as LoRA files trained on them are."""
    def linear_or_conv(model, wanted):
        return [name for name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(wanted)]

    unet = [name for name in linear_or_conv(modules["unet"], UNET_ATTENTION) if ".attn" in name] + UNET_EXTRA
    text = {target: ["text_model." + name.removeprefix("text_model.")
                     for name in linear_or_conv(modules[target], tuple("." + m for m in TEXT_MODULES))]
            for target in ("text_encoder", "text_encoder_2")}
    return {"unet": unet, **text}


def write_kohya(path: Path, layers) -> Path:
    """kohya layout: '<prefix><module with _>.lora_down.weight' / '.lora_up.weight' / '.alpha'."""
    tensors = {}
    for (target, name), (down, up) in layers.items():
        key = KOHYA[target] + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                    f"{key}.alpha": torch.tensor(ALPHA)}
    save_file(tensors, str(path))
    return path


def write_diffusers(folder: Path, layers) -> Path:
    """The diffusers/PEFT layout written by diffusers itself, with LoraConfig metadata per component."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    state = {target: {} for target in KOHYA}
    for (target, name), (down, up) in layers.items():
        state[target] |= {f"{name}.lora_A.weight": down.contiguous(), f"{name}.lora_B.weight": up.contiguous()}
    unet_targets = list(UNET_ATTENTION) + UNET_EXTRA
    config = {target: LoraConfig(r=RANK, lora_alpha=ALPHA,
                                 target_modules=unet_targets if target == "unet" else list(TEXT_MODULES)).to_dict()
              for target in KOHYA}
    StableDiffusionXLPipeline.save_lora_weights(
        str(folder), unet_lora_layers=state["unet"], text_encoder_lora_layers=state["text_encoder"],
        text_encoder_2_lora_layers=state["text_encoder_2"], unet_lora_adapter_metadata=config["unet"],
        text_encoder_lora_adapter_metadata=config["text_encoder"],
        text_encoder_2_lora_adapter_metadata=config["text_encoder_2"])
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_files(tiny_weights, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras_diffusers")
    modules = _modules(tiny_weights)
    layers = random_lora_factors(modules, _targets(modules), RANK)
    return {"kohya": write_kohya(folder / "kohya.safetensors", layers),
            "peft": write_diffusers(folder / "peft", layers), "layers": layers}


def test_files_are_the_formats_diffusers_reads(lora_files):
    """The kohya file is detected as kohya, the diffusers one carries peft's LoraConfig metadata."""
    from safetensors import safe_open

    from export.lora import parse_lora

    kohya, layers = parse_lora(lora_files["kohya"])
    peft, peft_layers = parse_lora(lora_files["peft"])
    assert (kohya, peft) == ("kohya", "peft") and len(layers) == len(peft_layers) == len(lora_files["layers"])
    assert {layer.alpha for layer in layers + peft_layers} == {ALPHA}
    with safe_open(str(lora_files["peft"]), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == RANK and metadata["text_encoder_2.lora_alpha"] == ALPHA
    assert "to_out.0" in metadata["unet.target_modules"]


def _diffusers_pipeline(weights: Path, lora: Path, fuse: bool):
    """diffusers' SDXL pipeline on the tiny files + load_ip_adapter + load_lora_weights (fused at SCALE if asked)."""
    pipe = diffusers_sdxl_ip_adapter(weights)
    pipe.set_ip_adapter_scale(IP_SCALE)
    pipe.load_lora_weights(str(lora))
    if fuse:
        pipe.fuse_lora(lora_scale=SCALE)
    return pipe


def _diffusers_latents(pipe, fuse: bool, steps: int = STEPS, guidance: float = GUIDANCE, **kwargs) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    if not fuse:
        kwargs["cross_attention_kwargs"] = {"scale": SCALE}
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=Image.fromarray(data.coffee()),
                    num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(SEED), output_type="latent", **kwargs).images


def _runtime_latents(build: Path, steps: int = STEPS, guidance: float = GUIDANCE, scheduler: str = "euler"):
    """Final latents of the build run by the runtime in ONNX Runtime."""
    from skimage import data

    from runtime.pipelines import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_build(build, "onnxruntime")
    return pipe(data.coffee(), PROMPT, NEGATIVE, return_latents=True, steps=steps, guidance=guidance,
                ip_scale=IP_SCALE, seed=SEED, width=SIZE, height=SIZE, num_images=1, scheduler=scheduler).latents


@pytest.fixture(scope="module")
def builds(tiny_weights, lora_files, tmp_path_factory) -> dict[str, Path]:
    """'plain', 'kohya' and 'peft': the tiny IP-Adapter build without and with each LoRA at SCALE."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("lora_builds")
    return {kind: export_lora_build(tiny_weights, folder / kind, [] if kind == "plain" else [f"{lora_files[kind]}:{SCALE}"])
            for kind in ("plain", "kohya", "peft")}


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_lora_build_equals_diffusers_load_lora_weights(tiny_weights, lora_files, builds, kind):
    """Runtime latents of the `--lora FILE:SCALE` build equal diffusers' pipeline with the same file loaded
    by load_lora_weights, unfused (scale per call) and fused (fuse_lora), and differ from the build without it."""
    path = lora_files[kind]
    latents = _runtime_latents(builds[kind])
    change = relative_error(latents, _runtime_latents(builds["plain"]))
    errors = {}
    for fuse in (False, True):
        pipe = _diffusers_pipeline(tiny_weights, path, fuse)
        errors["fuse_lora" if fuse else "cross_attention_kwargs"] = relative_error(latents,
                                                                                    _diffusers_latents(pipe, fuse))
    print(f"{kind} LoRA build vs diffusers load_lora_weights: latents rel "
          + ", ".join(f"{mode} {error:.2e}" for mode, error in errors.items()) + f"; vs no-LoRA build {change:.2e}")
    assert max(errors.values()) <= LATENT_TOL, errors
    assert change > 100 * LATENT_TOL


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_fused_modules_equal_diffusers_fuse_lora(tiny_weights, lora_files, kind):
    """Every UNet and text-encoder weight the exporter fuses equals diffusers' fuse_lora (within fp32 rounding of
    one product), and every LoRA layer of the file changed its weight in both."""
    from export.lora import LoraSpec, fuse_loras

    pipe = _diffusers_pipeline(tiny_weights, lora_files[kind], fuse=True)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    ours, base = _modules(tiny_weights), _modules(tiny_weights)
    assert fuse_loras(ours, [LoraSpec(lora_files[kind], SCALE)]) == len(lora_files["layers"])
    theirs = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    worst = 0.0
    for target, model in ours.items():
        reference, mine = theirs[target].state_dict(), model.state_dict()  # theirs also holds the IP-Adapter
        assert set(mine) <= set(reference), sorted(set(mine) - set(reference))[:5]
        for key, value in mine.items():
            worst = max(worst, float((value - reference[key]).abs().max()))
    for target, name in lora_files["layers"]:
        assert not torch.equal(module_weight(ours[target], name), module_weight(base[target], name)), (target, name)
    print(f"{kind}: exporter's fused weights vs diffusers fuse_lora: max abs difference {worst:.2e}")
    assert worst <= 1e-6


# scheduler preset, steps, guidance, the diffusers scheduler swapped in, its from_config settings, pipeline kwargs
RECIPES = [
    ("lcm", 8, 1.5, "LCMScheduler", {}, {}),  # LCM-LoRA, as InstantID's README runs it
    ("euler_trailing", 4, 0.0, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),  # SDXL-Lightning
    ("ddim_trailing", 4, 0.0, "DDIMScheduler", {"timestep_spacing": "trailing"}, {}),  # Hyper-SD N-step LoRA
    ("tcd", 4, 1.0, "TCDScheduler", {}, {"eta": 0.3}),  # TCD-LoRA / Hyper-SD unified LoRA
]


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe[0] for recipe in RECIPES])
def test_few_step_recipes_equal_diffusers(tiny_weights, lora_files, builds, recipe):
    """A few-step recipe on the LoRA build: the runtime preset equals diffusers with its scheduler swapped in."""
    from diffusers import schedulers as classes

    name, steps, guidance, class_name, settings, kwargs = recipe
    latents = _runtime_latents(builds["peft"], steps, guidance, name)
    pipe = _diffusers_pipeline(tiny_weights, lora_files["peft"], fuse=True)
    pipe.scheduler = getattr(classes, class_name).from_config(pipe.scheduler.config, **settings)
    expected = _diffusers_latents(pipe, True, steps, guidance, **kwargs)
    error = relative_error(latents, expected)
    print(f"{name}, {steps} steps, guidance {guidance}: runtime vs diffusers latents rel {error:.2e}")
    assert error <= LATENT_TOL
