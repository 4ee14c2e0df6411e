"""Model dimensions come from the checkpoint files, not the built-in specs (export.checkpoint_dims).

A tiny SDXL-family InstantID set whose sizes differ from every built-in spec (96-wide cross-attention
from a 32 + 64 text stack, 48-d pooled text embedding, UNet transformer depths [1, 2, 1], ControlNet
depths [1, 1, 3], a face Resampler of 8 queries, 128 wide with 2 heads; IP-Adapter Plus with 12 queries)
is written in the real hub formats by export.tiny's writer,
built with the real CLI as `--model sdxl --weights DIR` (`--precision fp32 --stage onnx`: the sdxl
spec's fp16 default is meant for GPUs and the engines stage needs TensorRT; the sdxl spec's 256 px
trace costs nothing at these widths), then run in the lean runtime on ONNX Runtime against the
PyTorch baseline on the same folder: final latents within 1e-5 relative (measured about 1e-6).

The end-to-end set keeps what diffusers' IP-Adapter converter assumes of every published checkpoint
(Resampler depth 4, ff x4, 64-wide heads; plain IP-Adapter 4 tokens), so a diffusers-built oracle
loads it too; depth, ff multiplier and token counts beyond those are read back from the tensors of
real modules in `test_projector_geometry_is_read_from_tensor_shapes`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_tiny import run_export_cli

from export.specs import SDXL, TINY, ImageProjConfig, ResamplerConfig

CROSS = 96          # text_encoder 32 + text_encoder_2 64 hidden sizes
POOLED = 48         # text_encoder_2 projection_dim = the UNet's text_embeds width
SIZE = 128
LATENT_TOL = 1e-5   # fp32 ONNX Runtime vs fp32 PyTorch


def variant_spec():
    """TINY with other widths and depths everywhere (see module docstring)."""
    added = POOLED + 6 * TINY.unet["addition_time_embed_dim"]
    return dataclasses.replace(
        TINY,
        unet={**TINY.unet, "cross_attention_dim": CROSS, "transformer_layers_per_block": [1, 2, 1],
              "projection_class_embeddings_input_dim": added},
        controlnet={**TINY.controlnet, "cross_attention_dim": CROSS, "transformer_layers_per_block": [1, 1, 3],
                    "projection_class_embeddings_input_dim": added},
        text_encoder_2={**TINY.text_encoder_2, "hidden_size": 64, "projection_dim": POOLED},
        instantid_resampler=ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=8,
                                            embedding_dim=512, output_dim=CROSS),
        ip_plus_resampler=ResamplerConfig(128, 4, 64, 2, 12, 32, CROSS),
        ip_image_proj=ImageProjConfig(16, CROSS, 4))


@pytest.fixture(scope="module")
def variant_weights(tmp_path_factory) -> Path:
    from export.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("variant") / "weights", seed=3, spec=variant_spec())


def test_sizes_are_read_from_the_files(variant_weights):
    from export.checkpoint_dims import checkpoint_spec, count_cross_attn_layers

    spec = checkpoint_spec(SDXL, variant_weights)
    wanted = variant_spec()
    assert spec.name == "sdxl" and spec.sdxl_source == SDXL.sdxl_source  # hub ids stay the spec's
    assert spec.cross_attention_dim == CROSS
    assert spec.unet["transformer_layers_per_block"] == [1, 2, 1]
    assert spec.controlnet["transformer_layers_per_block"] == [1, 1, 3]
    assert spec.text_encoder_2["projection_dim"] == POOLED
    assert spec.instantid_resampler == wanted.instantid_resampler
    assert spec.ip_plus_resampler == wanted.ip_plus_resampler
    assert spec.ip_image_proj == wanted.ip_image_proj
    # attn2 layers: down 2*1 + 2*2, mid 1, up 3*1 + 3*2 = 16 (the tiny spec's 14, SDXL's 70)
    assert count_cross_attn_layers(spec.unet) == 16 != count_cross_attn_layers(TINY.unet)
    assert checkpoint_spec(spec, variant_weights) is spec  # idempotent
    assert checkpoint_spec(SDXL, variant_weights, random_init=True) is SDXL  # the architecture itself


@pytest.mark.parametrize("config", [ResamplerConfig(96, 3, 64, 3, 5, 40, 72, 2), ResamplerConfig(128, 1, 64, 1, 7, 512, 80)])
def test_projector_geometry_is_read_from_tensor_shapes(config):
    """Depth (layer keys), heads (to_q rows / 64), ff multiplier, queries and widths of a real Resampler's
    tensors, and the token count of a real ImageProj, come back as the configs they were built with."""
    from export.adapters import ImageProj, Resampler
    from export.checkpoint_dims import image_proj_config, resampler_config

    def shapes(module):
        return {key: tuple(value.shape) for key, value in module.state_dict().items()}

    assert resampler_config(shapes(Resampler(config)), "test") == config
    plain = ImageProjConfig(embed_dim=24, cross_attention_dim=40, num_tokens=6)
    assert image_proj_config(shapes(ImageProj(plain)), "test") == plain


def test_resampler_width_disagreeing_with_the_unet_names_both_files(variant_weights, tmp_path):
    """A face Resampler made for another base model: a clear error with both files and both widths."""
    import shutil

    from export.checkpoint_dims import CheckpointMismatch, checkpoint_spec

    mixed = tmp_path / "mixed"
    shutil.copytree(variant_weights, mixed, ignore=shutil.ignore_patterns("antelopev2", "IP-Adapter"))
    config = mixed / "stable-diffusion-xl-base-1.0" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "cross_attention_dim": 80}))
    with pytest.raises(CheckpointMismatch) as error:
        checkpoint_spec(SDXL, mixed)
    message = str(error.value)
    assert "ip-adapter.bin" in message and str(config) in message and "96" in message and "80" in message


def test_loader_sizes_the_resampler_from_the_checkpoint(variant_weights):
    """The face Resampler is sized by ip-adapter.bin's tensors; against a UNet of another width it is an
    error with both numbers (not a state-dict size mismatch)."""
    from export import loaders
    from export.checkpoint_dims import CheckpointMismatch

    unet = loaders.load_unet(SDXL, variant_weights)
    resampler, ip_state = loaders.load_instantid_adapter(SDXL, unet, variant_weights)
    assert resampler.config == variant_spec().instantid_resampler
    assert resampler(torch.zeros(1, 512)).shape == (1, 8, CROSS) and len(ip_state) == 2 * 16
    narrow = loaders.load_unet(TINY, random_init=True)  # cross_attention_dim 64
    with pytest.raises(CheckpointMismatch, match=r"ip-adapter\.bin has 96 .* has 64"):
        loaders.load_instantid_adapter(SDXL, narrow, variant_weights)


@pytest.fixture(scope="module")
def variant_build(variant_weights, tmp_path_factory) -> Path:
    """`python -m export.build --model sdxl --weights DIR --precision fp32 --stage onnx` (all pipelines)."""
    out = tmp_path_factory.mktemp("variant") / "build"
    torch.set_num_threads(1)
    run_export_cli(["--model", "sdxl", "--weights", str(variant_weights), "--precision", "fp32", "--stage", "onnx",
                    "--out", str(out)])
    return out


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def test_build_facts_come_from_the_files(variant_build):
    facts = json.loads((variant_build / "assets" / "model.json").read_text())
    assert facts["model"] == "sdxl" and facts["cross_attention_dim"] == CROSS
    assert facts["num_cross_attn_layers"] == 16 and facts["text_embeds_dim"] == POOLED
    assert facts["ip_tokens"] == {"instantid": 8, "ip_adapter": 4, "ip_adapter_plus": 12}
    for pipeline, tokens in facts["ip_tokens"].items():
        assert np.load(variant_build / "assets" / f"negative_tokens_{pipeline}.npy").shape == (1, tokens, CROSS)


def test_instantid_from_files_matches_the_baseline(variant_weights, variant_build):
    """The ONNX Runtime InstantID pipeline's final latents equal the PyTorch baseline's (fp32)."""
    from benchmarks.pipelines import InstantIDBaseline
    from runtime.pipelines import InstantIDPipeline

    pipe = InstantIDPipeline.from_build(variant_build, "onnxruntime")
    baseline = InstantIDBaseline("sdxl", weights_dir=variant_weights)
    assert baseline.resampler.config.num_queries == 8 and baseline.unet.config.cross_attention_dim == CROSS
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal(512).astype(np.float32)
    kps_image = np.zeros((SIZE, SIZE, 3), np.uint8)
    kps_image[32:96:8, 24:104:4] = rng.integers(0, 256, (8, 20, 3), dtype=np.uint8)
    kwargs = dict(steps=3, guidance=5.0, ip_scale=0.7, controlnet_scale=0.8, seed=11, num_images=2,
                  scheduler="dpmpp_2m")
    result = pipe.generate(embedding, kps_image, "a photo of a person", "blurry", **kwargs)
    expected = baseline.generate(embedding, kps_image, "a photo of a person", "blurry", **kwargs)
    error = relative_error(result.latents, expected.latents)
    print(f"instantid, sdxl build from the variant's files vs baseline: latents rel {error:.2e}")
    assert result.latents.shape == expected.latents.shape == (2, 4, SIZE // 8, SIZE // 8)
    assert error <= LATENT_TOL
    assert pipe.unet.input("ip_scale").shape[0] == 16


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_ip_adapter_from_files_matches_the_baseline(variant_weights, variant_build, plus):
    """IP-Adapter (96-wide tokens) and Plus (12 queries, 2 heads) sized from their safetensors."""
    from skimage import data

    from benchmarks.pipelines import IPAdapterBaseline
    from runtime.pipelines import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_build(variant_build, "onnxruntime", plus=plus)
    baseline = IPAdapterBaseline("sdxl", plus=plus, weights_dir=variant_weights)
    kwargs = dict(steps=2, guidance=5.0, ip_scale=0.6, seed=5, width=SIZE, height=SIZE, num_images=1,
                  scheduler="euler")
    result = pipe(data.coffee(), "a cup on a table", None, return_latents=True, **kwargs)
    expected = baseline(data.coffee(), "a cup on a table", None, **kwargs)
    error = relative_error(result.latents, expected.latents)
    print(f"ip-adapter{' plus' if plus else ''}, sdxl build from the variant's files vs baseline: latents rel {error:.2e}")
    assert result.latents.shape == expected.latents.shape
    assert error <= LATENT_TOL
