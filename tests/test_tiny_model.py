"""The tiny model files: real formats, real loaders, deterministic, safe pickles."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from export import loaders
from export.specs import SDXL, TINY, Source, get_spec
from export.weights import WeightsNotFound, resolve


def test_layout_matches_the_hub_repositories(tiny_weights):
    sdxl = tiny_weights / "stable-diffusion-xl-base-1.0"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (sdxl / sub).is_dir(), sub
    assert (tiny_weights / "InstantID" / "ControlNetModel" / "config.json").is_file()
    assert (tiny_weights / "InstantID" / "ip-adapter.bin").is_file()
    for name in ("ip-adapter_sdxl_vit-h.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"):
        assert (tiny_weights / "IP-Adapter" / "sdxl_models" / name).is_file()
    assert (tiny_weights / "IP-Adapter" / "models" / "image_encoder" / "config.json").is_file()
    assert json.loads((sdxl / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"


def test_instantid_pickle_loads_with_weights_only(tiny_weights):
    state = torch.load(tiny_weights / "InstantID" / "ip-adapter.bin", weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert state["image_proj"]["latents"].shape == (1, 16, TINY.instantid_resampler.dim)
    assert state["image_proj"]["proj_in.weight"].shape == (TINY.instantid_resampler.dim, 512)
    # attn2 layers sit at odd indices of unet.attn_processors: 17 cross-attention layers at tiny width
    indices = sorted({int(key.split(".")[0]) for key in state["ip_adapter"]})
    assert indices == list(range(1, 34, 2))


def test_ip_adapter_safetensors_use_prefixed_keys(tiny_weights):
    flat = load_file(tiny_weights / "IP-Adapter" / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors")
    assert flat["image_proj.proj.weight"].shape == (4 * 64, 16)
    assert flat["ip_adapter.1.to_k_ip.weight"].shape[1] == TINY.cross_attention_dim
    plus = load_file(tiny_weights / "IP-Adapter" / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    assert plus["image_proj.latents"].shape == (1, 16, TINY.ip_plus_resampler.dim)


def test_loaders_read_the_files_the_writer_wrote(tiny_weights):
    unet = loaders.load_unet(TINY, tiny_weights)
    assert unet.config.cross_attention_dim == 64
    assert unet.config.block_out_channels == (16, 32, 32) or list(unet.config.block_out_channels) == [16, 32, 32]
    reference = load_file(tiny_weights / "stable-diffusion-xl-base-1.0" / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(unet.state_dict()["conv_in.weight"], reference["conv_in.weight"])
    text = loaders.load_text_stack(TINY, tiny_weights)
    assert text.tokenizer.pad_token == "<|endoftext|>" and text.tokenizer_2.pad_token == "!"
    ids = text.tokenizer("a photo of", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [49406, 320, 1125, 539, 49407] and len(ids) == 77
    resampler, ip_state = loaders.load_instantid_adapter(TINY, unet, tiny_weights)
    assert len(ip_state) == 34
    assert resampler(torch.randn(2, 512)).shape == (2, 16, 64)


def test_writer_is_deterministic(tiny_weights, tmp_path):
    from export.tiny import write_tiny

    again = write_tiny(tmp_path / "again")
    for rel in ("stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors",
                "InstantID/ControlNetModel/diffusion_pytorch_model.safetensors"):
        first, second = load_file(tiny_weights / rel), load_file(again / rel)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_missing_local_weights_name_the_file_and_the_flag(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"InstantID/ip-adapter.bin not found.*--weights DIR.*--random-init"):
        resolve(SDXL.instantid_adapter_source, tmp_path)


def test_offline_hub_gives_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFound, match="not in the hub cache.*--weights DIR"):
        resolve(Source("InstantX/InstantID", "ip-adapter.bin"))


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match=r"\['sd15', 'sdxl', 'tiny', 'tiny-sd15'\]"):
        get_spec("sd3")


def test_sdxl_spec_has_the_published_geometry():
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL.unet)
        controlnet = ControlNetModel.from_config(SDXL.controlnet)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(2.567e9, rel=2e-3)
    assert sum(p.numel() for p in controlnet.parameters()) == pytest.approx(1.251e9, rel=2e-3)
    assert sum(name.endswith("attn2.processor") for name in unet.attn_processors) == 70
