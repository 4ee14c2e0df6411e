"""InstantStyle: the IP-Adapter scale per UNet block (runtime/ip_scales.py), as diffusers'
`pipe.set_ip_adapter_scale(dict)` takes it, mapped onto the engines' per-layer λ (no rebuild).

The oracle is diffusers' StableDiffusionXLPipeline + load_ip_adapter on the tiny build's files with
set_ip_adapter_scale(the same dict): its processors' scales layer by layer, and its latents against the
runtime's (ONNX Runtime, fp32) within 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
from fixtures_tiny import diffusers_sdxl_ip_adapter, relative_error

from export.specs import TINY, get_spec
from runtime.ip_scales import PRESETS, BlockScaleError, BlockScales, cross_attention_layer_names, parse_block_scales

SIZE, STEPS, SEED, GUIDANCE = 64, 3, 5, 5.0
PROMPT, NEGATIVE = "a cup on a table", "blurry"
CUSTOM = {"down": 0.5, "mid": 0.7, "up": {"block_1": [0.1, 0.2, 0.3]}}
DICTS = [PRESETS["style"], PRESETS["style_layout"], CUSTOM, {"up": {"block_0": 0.9}, "mid": [0.4]}, {"down": 1.0}]


@pytest.fixture(scope="module")
def oracle(tiny_build):
    """diffusers' SDXL pipeline on the tiny build's weights + load_ip_adapter (plain IP-Adapter)."""
    return diffusers_sdxl_ip_adapter(tiny_build / "weights")


@pytest.fixture(scope="module")
def ip_adapter(tiny_build):
    from runtime.pipelines import IPAdapterPipeline

    return IPAdapterPipeline.from_build(tiny_build, "onnxruntime")


def _diffusers_scales(pipe, scale) -> list[float]:
    """λ of every attn2 layer after diffusers' set_ip_adapter_scale(scale), in attn_processors order."""
    pipe.set_ip_adapter_scale(scale)
    return [processor.scale[0] for name, processor in pipe.unet.attn_processors.items()
            if name.endswith("attn2.processor")]


def test_layer_names_are_diffusers_and_in_the_model_facts(tiny_build, oracle):
    from diffusers import UNet2DConditionModel

    from export.adapters import cross_attention_layers
    from runtime.assets import Assets

    names = Assets.open(tiny_build).cross_attention_layers()
    assert names == cross_attention_layers(oracle.unet) == cross_attention_layer_names(TINY.unet) and len(names) == 17
    for model in ("sdxl", "tiny-sd15"):
        config = get_spec(model).unet
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        assert cross_attention_layer_names(config) == cross_attention_layers(unet)


@pytest.mark.parametrize("scale", DICTS + ["style", "style_layout"], ids=lambda s: str(s).replace(" ", ""))
def test_block_scales_expand_as_diffusers_does(oracle, scale):
    """Which layer gets which λ: the same as diffusers' processors after set_ip_adapter_scale(dict)."""
    names = cross_attention_layer_names(TINY.unet)
    expected = _diffusers_scales(oracle, PRESETS[scale] if isinstance(scale, str) else scale)
    assert list(parse_block_scales(scale).layer_scales(names)) == expected
    assert 0.0 in expected  # the layers a dict does not name get 0, not the float default


@pytest.mark.parametrize("scale", ["style_layout", CUSTOM], ids=["style_layout", "custom"])
def test_runtime_equals_diffusers_with_block_scales(oracle, ip_adapter, scale):
    from PIL import Image
    from skimage import data

    oracle.set_ip_adapter_scale(PRESETS[scale] if isinstance(scale, str) else scale)
    with torch.no_grad():
        expected = oracle(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=Image.fromarray(data.coffee()),
                          num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                          generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    latents = ip_adapter(data.coffee(), PROMPT, NEGATIVE, return_latents=True, decode=False, steps=STEPS,
                         guidance=GUIDANCE, ip_scale=scale, seed=SEED, width=SIZE, height=SIZE).latents
    error = relative_error(latents, expected)
    print(f"ip_scale={scale}: runtime vs diffusers latents rel {error:.2e}")
    assert error <= 1e-5
    uniform = ip_adapter(data.coffee(), PROMPT, NEGATIVE, return_latents=True, decode=False, steps=STEPS,
                         guidance=GUIDANCE, ip_scale=0.6, seed=SEED, width=SIZE, height=SIZE).latents
    assert relative_error(latents, uniform) > 1e-4  # the blocks matter


def test_presets_are_their_dicts_in_requests_and_images(ip_adapter, tiny_build):
    from skimage import data

    from runtime.requests import InstantIDRequest, IPAdapterRequest, loop_settings

    for name, block_dict in PRESETS.items():
        by_name, by_dict = IPAdapterRequest("p.jpg", "x", ip_scale=name), IPAdapterRequest("p.jpg", "x",
                                                                                           ip_scale=block_dict)
        assert isinstance(by_name.ip_scale, BlockScales) and by_name == by_dict
        assert loop_settings(by_name, 64, 64) == loop_settings(by_dict, 64, 64)
        assert by_name.ip_scale.as_dict() == block_dict
        assert InstantIDRequest("p.jpg", "x", ip_scale=name).ip_scale == by_dict.ip_scale
    run = [ip_adapter(data.coffee(), PROMPT, return_latents=True, decode=False, steps=2, ip_scale=scale, seed=SEED,
                      width=SIZE, height=SIZE).latents
           for scale in ("style", PRESETS["style"], parse_block_scales("style").layer_scales(
               cross_attention_layer_names(TINY.unet)))]
    torch.testing.assert_close(run[0], run[1], rtol=0, atol=0)
    torch.testing.assert_close(run[0], run[2], rtol=0, atol=0)  # = the per-layer tuple it expands to


def test_instantid_takes_block_scales(tiny_build):
    """The InstantID pipeline maps the dict the same way (its UNet's ip_scale input)."""
    import numpy as np

    from runtime.face import draw_kps
    from runtime.pipelines import InstantIDPipeline

    pipe = InstantIDPipeline.from_build(tiny_build, "onnxruntime")
    embedding = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    kps = draw_kps(SIZE, SIZE, np.array([[22, 26], [42, 26], [32, 37], [24, 48], [40, 48]], np.float32))
    per_layer = parse_block_scales("style_layout").layer_scales(cross_attention_layer_names(TINY.unet))
    runs = [pipe.generate(embedding, kps, PROMPT, steps=2, seed=SEED, ip_scale=scale, decode=False).latents
            for scale in ("style_layout", per_layer)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_bad_blocks_say_which_blocks_exist(ip_adapter):
    """Checked as the request is prepared (a server answers that request 422; its batch runs on)."""
    from skimage import data

    with pytest.raises(ValueError, match=r"down\.block_0.*blocks with cross-attention: down\.block_1 \(2 "
                       r"transformer layers\), down\.block_2 \(2 transformer layers\), mid \(1 transformer layer\), "
                       r"up\.block_0 \(3 transformer layers\), up\.block_1 \(3 transformer layers\)"):
        ip_adapter(data.coffee(), PROMPT, steps=1, ip_scale={"down": {"block_0": 1.0}}, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match=r"up\.block_0 has 3 transformer layers, got 2 values"):
        ip_adapter(data.coffee(), PROMPT, steps=1, ip_scale={"up": {"block_0": [1.0, 0.0]}}, width=SIZE, height=SIZE)
    sd15 = cross_attention_layer_names(get_spec("tiny-sd15").unet)  # SD1.5's up.block_0 has no attention
    with pytest.raises(BlockScaleError, match=r"preset 'style' is made for SDXL's block layout.*up\.block_1 \(3"):
        parse_block_scales("style").layer_scales(sd15)
    assert parse_block_scales({"up": {"block_1": [0.0, 1.0, 0.0]}}).layer_scales(sd15).count(1.0) == 1


@pytest.mark.parametrize("value,message", [
    ("styel", r"neither a preset \(style, style_layout\)"), ({"left": 1.0}, "unknown key.*down, mid and up"),
    ({"up": {"blk_0": 1.0}}, "not named block_<i>"), ({"up": {"block_0": [0.0, 9.0, 0.0]}}, r"up\.block_0=9.0 is "
                                                       "outside 0..4"), ({"mid": [0.1, 0.2]}, "mid has one"),
    ({"up": {"block_0": []}}, "empty list"), ({"down": True}, "finite number")])
def test_request_checks_block_dicts(value, message):
    from runtime.requests import IPAdapterRequest, RequestError

    with pytest.raises(RequestError, match=message):
        IPAdapterRequest("p.jpg", "x", ip_scale=value)


def test_http_and_cli_take_dicts_and_presets():
    import base64

    from runtime.serve.inputs import to_request, validate
    from runtime.serve.schemas import BadRequest

    image = base64.b64encode(b"not decoded here").decode()
    for value in (PRESETS["style_layout"], "style_layout"):
        body, _ = validate("ip-adapter", {"prompt": "x", "image": image, "ip_scale": value})
        assert to_request("ip-adapter", body, {}).ip_scale == parse_block_scales("style_layout")
    with pytest.raises(BadRequest, match=r"up\.block_0=9.0 is outside 0..4"):
        validate("ip-adapter", {"prompt": "x", "image": image, "ip_scale": {"up": {"block_0": [1, 9, 1]}}})
    from runtime.requests import IPAdapterRequest  # CLI and form text: a preset name or JSON

    assert IPAdapterRequest("p.jpg", "x", ip_scale='{"up": {"block_0": [0.0, 1.0, 0.0]}}').ip_scale == \
        parse_block_scales("style")


def test_a_build_without_layer_names_says_to_re_export(tiny_build, tmp_path):
    import json

    from runtime.assets import AssetError, Assets

    assets = Assets.open(tiny_build)
    assets.metadata.pop("cross_attention_layers")
    with pytest.raises(AssetError, match="cross_attention_layers.*re-export: python -m export.build"):
        assets.cross_attention_layers()
    (tmp_path / "assets" / "unet").mkdir(parents=True)
    (tmp_path / "assets" / "unet" / "config.json").write_text(json.dumps(TINY.unet))
    assets.build_dir = tmp_path  # an older build with its UNet config: derived from it
    assert assets.cross_attention_layers() == cross_attention_layer_names(TINY.unet)
