"""`python -m export.build` end to end on the tiny model (--stage onnx): files, manifest, assets,
the I/O contract, deterministic names and bytes, one external-data file for big models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_tiny import ort_session, run_export_cli

from engine.manifest import load_manifest, sha256_files
from export import loaders, onnx_export
from export.build import COMPONENTS, parse_args
from export.specs import TINY

RESIDUALS = [f"down_residual_{i}" for i in range(9)] + ["mid_residual"]
UNET_INPUTS = ["sample", "timestep", "text_tokens", "ip_tokens", "ip_scale", "text_embeds", "time_ids", *RESIDUALS]
CONTRACT = {  # component: (inputs, outputs), as DESIGN.md's table and export/components.py document them
    "text_encoder": (["input_ids"], ["hidden_states"]),
    "text_encoder_2": (["input_ids"], ["hidden_states", "text_embeds"]),
    "image_encoder": (["pixel_values"], ["image_embeds", "hidden_states"]),
    "face_detector": (["image"], [f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)]),
    "arcface": (["crops"], ["embedding"]),
    "face_proj": (["face_embedding"], ["face_tokens"]),
    "image_proj": (["image_embeds"], ["ip_tokens"]),
    "image_proj_plus": (["hidden_states"], ["ip_tokens"]),
    "controlnet": (["sample", "timestep", "face_tokens", "control_image", "text_embeds", "time_ids",
                    "conditioning_scale"], RESIDUALS),
    "unet_instantid": (UNET_INPUTS, ["noise_pred"]),
    "unet_ip_adapter": (UNET_INPUTS, ["noise_pred"]),
    "unet_ip_adapter_plus": (UNET_INPUTS, ["noise_pred"]),
    "vae_decoder": (["latents"], ["image"]),
}
FP32_ALWAYS = {"timestep", "ip_scale", "conditioning_scale"}


def _io(record) -> tuple[list, list]:
    return [t.name for t in record.inputs], [t.name for t in record.outputs]


@pytest.mark.parametrize("build", ["fp32", "fp16"])
def test_manifest_lists_every_component_with_its_contract(build, tiny_onnx_fp32, tiny_onnx_fp16):
    out = {"fp32": tiny_onnx_fp32, "fp16": tiny_onnx_fp16}[build]
    manifest = load_manifest(out)
    assert manifest.model == "tiny" and list(manifest.components) == list(COMPONENTS)
    for name, component in manifest.components.items():
        record = component.onnx
        assert _io(record) == CONTRACT[name], name
        files = [out / record.path] + [out / "onnx" / f for f in record.external_data]
        assert record.path == f"onnx/{name}.onnx" and record.sha256 == sha256_files(files)
        assert record.opset >= 17 and record.params > 0 and record.export_seconds >= 0
        half = build == "fp16" and name not in ("face_detector", "arcface", "vae_decoder")
        assert record.export_flags["precision"] == ("fp16" if half else "fp32"), name
        for tensor in record.inputs + record.outputs:
            want = ("int64" if tensor.name == "input_ids" else
                    "float32" if tensor.name in FP32_ALWAYS or not half else "float16")
            assert tensor.dtype == want, (name, tensor.name)
    unet = manifest.components["unet_instantid"].onnx
    dims = {t.name: t.shape for t in unet.inputs}
    assert dims["sample"] == ("2B", 4, "latent_height", "latent_width")
    assert dims["ip_scale"] == (17,) and dims["ip_tokens"] == ("2B", 16, 64)
    assert dims["down_residual_8"] == ("2B", 32, "latent_height/4", "latent_width/4")
    assert {t.name: t.shape for t in manifest.components["unet_ip_adapter"].onnx.inputs}["ip_tokens"] == ("2B", 4, 64)
    vae = manifest.components["vae_decoder"].onnx
    assert vae.outputs[0].shape == ("batch", 3, "height", "width")
    meta = manifest.metadata
    assert meta["num_cross_attn_layers"] == 17 and meta["precision"] == build
    assert meta["pipelines"]["instantid"][-1] == "vae_decoder" and meta["face_detector"] == "yunet"


def test_assets_hold_what_the_runtime_needs(tiny_onnx_fp32):
    from tokenizers import Tokenizer

    assets, weights = tiny_onnx_fp32 / "assets", tiny_onnx_fp32 / "weights"
    facts = json.loads((assets / "model.json").read_text())
    assert facts["vae_scaling_factor"] == TINY.vae["scaling_factor"] and facts["vae_scale_factor"] == 8
    assert facts["ip_tokens"] == {"instantid": 16, "ip_adapter": 4, "ip_adapter_plus": 16}
    assert json.loads((assets / "scheduler_config.json").read_text())["_class_name"] == "EulerDiscreteScheduler"

    stack = loaders.load_text_stack(TINY, weights)
    for folder, tokenizer in (("tokenizer", stack.tokenizer), ("tokenizer_2", stack.tokenizer_2)):
        fast = Tokenizer.from_file(str(assets / folder / "tokenizer.json"))
        prompt = "a photo of an astronaut, oil painting"
        assert fast.encode(prompt).ids == tokenizer(prompt).input_ids

    with torch.no_grad():
        resampler, _ = loaders.load_instantid_adapter(TINY, None, weights)
        expected = {"instantid": resampler(torch.zeros(1, 1, 512))}
        projector, _ = loaders.load_ip_adapter(TINY, None, False, weights)
        expected["ip_adapter"] = projector(torch.zeros(1, TINY.ip_image_proj.embed_dim))
        plus, _ = loaders.load_ip_adapter(TINY, None, True, weights)
        encoder = loaders.load_image_encoder(TINY, weights)
        hidden = encoder(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        expected["ip_adapter_plus"] = plus(hidden)
    for pipeline, tokens in expected.items():
        cached = np.load(assets / f"negative_tokens_{pipeline}.npy")
        assert cached.dtype == np.float32 and cached.shape == tuple(tokens.shape)
        np.testing.assert_allclose(cached, tokens.numpy(), rtol=1e-5, atol=1e-6)


def test_reexport_is_byte_identical_and_prints_a_summary(tiny_onnx_fp32, tiny_onnx_fp16, tmp_path, capsys):
    names = ["text_encoder_2", "face_proj", "controlnet"]
    out = tmp_path / "again"
    run_export_cli(["--model", "tiny", "--stage", "onnx", "--weights", str(tiny_onnx_fp32 / "weights"),
                    "--pipeline", "instantid", "--components", *names, "--out", str(out)])
    table = capsys.readouterr().out
    assert "component" in table and "file MB" in table and "controlnet" in table and "total" in table
    again, first, half = load_manifest(out), load_manifest(tiny_onnx_fp32), load_manifest(tiny_onnx_fp16)
    assert list(again.components) == names
    for name in names:
        assert again.components[name].onnx.sha256 == first.components[name].onnx.sha256, name
        spec = [(t.name, t.shape) for t in again.components[name].onnx.inputs + again.components[name].onnx.outputs]
        assert spec == [(t.name, t.shape) for t in half.components[name].onnx.inputs + half.components[name].onnx.outputs]


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    from export.build import main

    assert main(["--model", "tiny", "--stage", "onnx", "--pipeline", "ip-adapter", "--components", "controlnet",
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --components controlnet: not part of pipelines")
    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny", "--weights", str(tmp_path / "missing")])
    assert capsys.readouterr().err.startswith(f"error: --weights {tmp_path / 'missing'} is not a folder")
    options = parse_args(["--model", "sdxl", "--pipeline", "instantid"])
    assert options.precision == "fp16" and str(options.out) == "build/sdxl" and options.attention == "stacked"
    assert parse_args(["--model", "tiny"]).precision == "fp32"


def test_big_models_get_one_external_data_file(tiny_onnx_fp32, tmp_path, monkeypatch):
    from export.sources import Sources

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    component = Sources(TINY, tiny_onnx_fp32 / "weights", False, torch.float32, tmp_path / "assets").make("face_proj")
    path = tmp_path / "onnx" / "face_proj.onnx"
    onnx_export.export_component(component, path, onnx_export.trace_sizes(TINY.trace_resolution))
    assert sorted(p.name for p in path.parent.iterdir()) == ["face_proj.onnx", "face_proj.onnx.data"]
    assert path.stat().st_size < 100_000 < (path.parent / "face_proj.onnx.data").stat().st_size
    embedding = np.random.default_rng().standard_normal((2, 512)).astype(np.float32)
    ours = ort_session(path).run(None, {"face_embedding": embedding})[0]
    reference = ort_session(tiny_onnx_fp32 / "onnx" / "face_proj.onnx").run(None, {"face_embedding": embedding})[0]
    np.testing.assert_array_equal(ours, reference)
