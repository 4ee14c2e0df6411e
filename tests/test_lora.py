"""LoRA files fused before export (export.lora, `python -m export.build --lora FILE[:SCALE]`).

Tiny LoRA files in the kohya (`lora_unet_…lora_down/lora_up/alpha`, `lora_te1_`, `lora_te2_`) and the
diffusers/PEFT (`unet.….lora_A/lora_B`, alpha in the `lora_adapter_metadata` header) layouts are written
with safetensors for the tiny model: Linear layers in attention, feed-forward and both text encoders,
and 3x3 / 1x1 convolutions. The fused weights are compared with an independent reference computed
from the raw tensors (W + scale * alpha / r * up @ down), and for kohya the module names with
diffusers' own key conversion. End to end, an IP-Adapter build with `--lora` runs in ONNX Runtime
against the PyTorch baseline given the same fused modules (fp32 latents within 1e-5 relative) and
differs from the build without the LoRA. tests/test_lora_diffusers.py compares builds with diffusers'
own `load_lora_weights` (peft) on files in the layouts published LoRAs use.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_tiny import export_lora_build, module_weight, random_lora_factors, relative_error
from safetensors.torch import save_file

from export.specs import TINY

RANK, ALPHA, SCALE = 4, 3.0, 0.7
SIZE = 64
LATENT_TOL = 1e-5
UNET_LAYERS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
               "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
               "down_blocks.1.attentions.0.proj_in", "down_blocks.1.resnets.0.conv1",
               "down_blocks.1.resnets.0.conv_shortcut", "conv_in"]
TE_LAYERS = {"text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"],
             "text_encoder_2": ["text_model.encoder.layers.0.self_attn.v_proj",
                                "text_model.encoder.layers.1.self_attn.out_proj"]}
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _modules(weights: Path) -> dict[str, torch.nn.Module]:
    from export import loaders

    text = loaders.load_text_stack(TINY, weights)
    return {"unet": loaders.load_unet(TINY, weights), "text_encoder": text.text_encoder,
            "text_encoder_2": text.text_encoder_2}


def write_lora(path: Path, layers, kind: str) -> Path:
    """Write `layers` as a kohya or diffusers/PEFT .safetensors file with alpha ALPHA."""
    tensors, metadata = {}, None
    for (target, name), (down, up) in layers.items():
        if kind == "kohya":
            key = KOHYA[target] + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
        else:
            tensors |= {f"{target}.{name}.lora_A.weight": down, f"{target}.{name}.lora_B.weight": up}
    if kind == "peft":
        metadata = {"lora_adapter_metadata": json.dumps(  # as diffusers writes a LoraConfig per component
            {f"{target}.{field}": value for target in KOHYA for field, value in
             (("r", RANK), ("lora_alpha", ALPHA), ("target_modules", [n for t, n in layers if t == target]))})}
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lora_files(tiny_weights, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("loras")
    layers = random_lora_factors(_modules(tiny_weights), {"unet": UNET_LAYERS, **TE_LAYERS}, RANK)
    return {kind: (write_lora(folder / f"{kind}.safetensors", layers, kind), layers) for kind in ("kohya", "peft")}


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_fused_weights_equal_the_reference(tiny_weights, lora_files, kind):
    """Every listed weight becomes W + SCALE * ALPHA / RANK * up @ down; all other weights stay as loaded."""
    from export.lora import LoraSpec, fuse_loras, parse_lora

    path, layers = lora_files[kind]
    assert parse_lora(path)[0] == kind
    original, fused = _modules(tiny_weights), _modules(tiny_weights)
    assert fuse_loras(fused, [LoraSpec.parse(f"{path}:{SCALE}")]) == len(layers)
    for (target, name), (down, up) in layers.items():
        before = module_weight(original[target], name)
        expected = before + SCALE * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
        torch.testing.assert_close(module_weight(fused[target], name), expected, rtol=0, atol=1e-6)
        assert not torch.equal(module_weight(fused[target], name), before)
    touched = {(target, name if hasattr(original[target], "text_model") or target == "unet"
                else name.removeprefix("text_model.")) for target, name in layers}
    for target in original:
        for key, value in original[target].state_dict().items():
            if (target, key.removesuffix(".weight")) not in touched:
                assert torch.equal(fused[target].state_dict()[key], value), f"{target}.{key} changed"


def test_kohya_names_follow_diffusers_conversion(lora_files):
    """The kohya file's modules are the ones diffusers' own converter names (its 'lora' key parts removed)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    from export.lora import parse_lora

    path, layers = lora_files["kohya"]
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(path)))
    names = {key.replace(".processor", "").split(".lora")[0].split("_lora")[0] for key in converted}
    names = {name.replace("self_attn.to_q", "self_attn.q_proj").replace("self_attn.to_v", "self_attn.v_proj")
             .replace("self_attn.to_out", "self_attn.out_proj") for name in names}
    _, parsed = parse_lora(path)
    assert names == {f"{layer.target}.{layer.module}" for layer in parsed} == {f"{t}.{n}" for t, n in layers}
    assert set(alphas.values()) == {ALPHA} and {layer.alpha for layer in parsed} == {ALPHA}


def test_kohya_sgm_block_names_are_mapped(tiny_weights, lora_files, tmp_path):
    """kohya's SGM names (input_blocks 4, attention 1 = down_blocks.1.attentions.0 at 2 layers per block) fuse
    like the diffusers-named file, given the UNet config."""
    from safetensors.torch import load_file

    from export.lora import LoraSpec, fuse_loras

    path, _ = lora_files["kohya"]
    prefix = "lora_unet_down_blocks_1_attentions_0_"
    tensors = {key.replace(prefix, "lora_unet_input_blocks_4_1_"): value for key, value in load_file(str(path)).items()
               if key.startswith(prefix)}
    assert len(tensors) == 3 * 3  # to_q, to_k, proj_in: down, up, alpha
    sgm, plain = tmp_path / "sgm.safetensors", tmp_path / "plain.safetensors"
    save_file(tensors, str(sgm))
    save_file({key.replace("lora_unet_input_blocks_4_1_", prefix): value for key, value in tensors.items()}, str(plain))
    mapped, expected = _modules(tiny_weights)["unet"], _modules(tiny_weights)["unet"]
    assert fuse_loras({"unet": mapped}, [LoraSpec(sgm, SCALE)], mapped.config) == 3
    assert fuse_loras({"unet": expected}, [LoraSpec(plain, SCALE)]) == 3
    for key, value in expected.state_dict().items():
        assert torch.equal(mapped.state_dict()[key], value), key


def test_unknown_keys_are_a_clear_error(tiny_weights, lora_files, tmp_path):
    from safetensors.torch import load_file

    from export.lora import LoraError, LoraSpec, fuse_loras

    path, _ = lora_files["peft"]
    tensors = load_file(str(path)) | {"unet.not_a_block.0.to_q.lora_A.weight": torch.zeros(RANK, 32),
                                      "unet.not_a_block.0.to_q.lora_B.weight": torch.zeros(32, RANK)}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    modules = _modules(tiny_weights)
    before = module_weight(modules["unet"], UNET_LAYERS[0]).clone()
    with pytest.raises(LoraError, match=r"peft format.*not_a_block"):
        fuse_loras(modules, [LoraSpec(bad)])
    assert torch.equal(module_weight(modules["unet"], UNET_LAYERS[0]), before)  # nothing fused
    save_file({"model.layer.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(LoraError, match="unknown LoRA layout"):
        fuse_loras(modules, [LoraSpec(bad)])


def test_lora_argument_parses_file_and_scale():
    from export.lora import LoraSpec

    assert LoraSpec.parse("a/b.safetensors:0.5") == LoraSpec(Path("a/b.safetensors"), 0.5)
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec(Path("a/b.safetensors"), 1.0)
    assert LoraSpec.parse("C:/x.safetensors") == LoraSpec(Path("C:/x.safetensors"), 1.0)


def _generate(pipe):
    from skimage import data

    kwargs = dict(steps=2, guidance=5.0, ip_scale=0.6, seed=5, width=SIZE, height=SIZE, num_images=1,
                  scheduler="euler")
    return data.coffee(), "a cup on a table", None, kwargs


@pytest.fixture(scope="module")
def plain_latents(tiny_weights, tmp_path_factory):
    from runtime.pipelines import IPAdapterPipeline

    torch.set_num_threads(1)
    build = export_lora_build(tiny_weights, tmp_path_factory.mktemp("plain") / "build", [])
    image, prompt, negative, kwargs = _generate(None)
    return IPAdapterPipeline.from_build(build, "onnxruntime")(image, prompt, negative, return_latents=True,
                                                               **kwargs).latents


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_build_with_lora_matches_the_fused_baseline(tiny_weights, lora_files, plain_latents, tmp_path, kind):
    """ONNX Runtime latents of a `--lora` build equal the baseline with the same LoRA fused, and differ from
    the build without it; the manifest records the file, its sha256 and the scale."""
    import hashlib

    from benchmarks.pipelines import IPAdapterBaseline
    from export.lora import LoraSpec, fuse_loras
    from runtime.pipelines import IPAdapterPipeline

    path, _ = lora_files[kind]
    build = export_lora_build(tiny_weights, tmp_path / "build", [f"{path}:{SCALE}"])
    manifest = json.loads((build / "manifest.json").read_text())
    record = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "scale": SCALE}
    assert json.dumps(record) in json.dumps(manifest)
    image, prompt, negative, kwargs = _generate(None)
    result = IPAdapterPipeline.from_build(build, "onnxruntime")(image, prompt, negative, return_latents=True, **kwargs)
    baseline = IPAdapterBaseline("tiny", weights_dir=tiny_weights)
    fuse_loras({"unet": baseline.unet, "text_encoder": baseline.text.text_encoder,
                "text_encoder_2": baseline.text.text_encoder_2}, [LoraSpec(path, SCALE)])
    expected = baseline(image, prompt, negative, **kwargs)
    error = relative_error(result.latents, expected.latents)
    change = relative_error(result.latents, plain_latents)
    print(f"{kind} LoRA build vs fused baseline: latents rel {error:.2e}; vs no-LoRA build {change:.2e}")
    assert error <= LATENT_TOL
    assert change > 100 * LATENT_TOL
