"""Optimisation profiles from pipeline geometry and the dynamic-axis naming convention."""
from __future__ import annotations

import pytest

from engine.profiles import (Geometry, ProfileError, Range, ShapeRange, dim_range, output_range,
                             parse_dim, parse_range, profile_for, shape_range, solve_symbols)

UNET_SAMPLE = ["2B", 4, "latent_height", "latent_width"]


def test_default_geometry_unet_sample_with_cfg():
    shapes = shape_range(UNET_SAMPLE, Geometry())
    # 1 row: one image at guidance <= 1 (no CFG pair, as diffusers); 2 per image otherwise
    assert shapes == ShapeRange((1, 4, 64, 64), (2, 4, 128, 128), (8, 4, 192, 192))
    assert not shapes.is_static


@pytest.mark.parametrize("name, expected", [
    ("batch", (1, 1, 4)), ("B", (1, 1, 4)),
    ("2B", (1, 2, 8)), ("2*batch", (1, 2, 8)), ("batch * 2", (1, 2, 8)), ("3*batch", (3, 3, 12)),
    ("height", (512, 1024, 1536)), ("W", (512, 1024, 1536)),
    ("latent_height", (64, 128, 192)), ("latent_width", (64, 128, 192)),
    ("latent_height/2", (32, 64, 96)), ("latent_width//4", (16, 32, 48)),
    ("8*latent_height", (512, 1024, 1536)),
])
def test_axis_names(name, expected):
    assert dim_range(name, Geometry()) == Range(*expected)


def test_static_fast_path_for_one_serving_size():
    geometry = Geometry.fixed(batch=2, height=768, width=1024)
    assert geometry.is_static
    shapes = shape_range(UNET_SAMPLE, geometry)
    assert shapes.min == shapes.opt == shapes.max == (4, 4, 96, 128)
    assert shapes.is_static


def test_profile_for_component_inputs():
    controlnet = {
        "sample": UNET_SAMPLE,
        "timestep": [],
        "encoder_hidden_states": ["2B", 16, 2048],
        "controlnet_cond": ["2B", 3, "height", "width"],
        "text_embeds": ["2B", 1280],
    }
    geometry = Geometry(batch=Range(1, 2, 4), height=Range(512, 1024, 1024), width=Range(768, 768, 1536))
    profile = profile_for(controlnet, geometry)
    assert profile["timestep"] == ShapeRange((), (), ())
    assert profile["encoder_hidden_states"] == ShapeRange((1, 16, 2048), (4, 16, 2048), (8, 16, 2048))
    assert profile["controlnet_cond"] == ShapeRange((1, 3, 512, 768), (4, 3, 1024, 768), (8, 3, 1024, 1536))
    assert profile["sample"].max == (8, 4, 128, 192)
    assert solve_symbols(controlnet, profile)["batch"] == Range(1, 2, 4)
    assert output_range(["2B", 4, "latent_height", "latent_width"], solve_symbols(controlnet, profile)) == \
        profile["sample"]


def test_cfg_rows_of_a_fixed_batch_stay_exact():
    """A fixed batch keeps 2·batch rows (min = max): the static path stays static, and the batch solves back."""
    geometry = Geometry(batch=Range(2, 2, 2))
    profile = profile_for({"sample": UNET_SAMPLE}, geometry)
    assert profile["sample"].min[0] == profile["sample"].max[0] == 4
    assert solve_symbols({"sample": UNET_SAMPLE}, profile)["batch"] == Range(2, 2, 2)
    ranged = profile_for({"sample": UNET_SAMPLE}, Geometry(batch=Range(2, 2, 4)))
    assert ranged["sample"].min[0] == 2 and solve_symbols({"sample": UNET_SAMPLE}, ranged)["batch"] == Range(2, 2, 4)


def test_output_sizes_from_solved_symbols():
    inputs = {"latents": ["batch", 4, "latent_height", "latent_width"]}
    profile = profile_for(inputs, Geometry())
    bases = solve_symbols(inputs, profile)
    assert bases == {"batch": Range(1, 1, 4), "height": Range(512, 1024, 1536), "width": Range(512, 1024, 1536)}
    image = output_range(["batch", 3, "height", "width"], bases)
    assert image == ShapeRange((1, 3, 512, 512), (1, 3, 1024, 1024), (4, 3, 1536, 1536))
    assert output_range(["batch", "s38"], bases) is None  # an axis the convention does not know


def test_errors_say_what_to_do():
    with pytest.raises(ProfileError, match="multiple of 64"):
        Geometry(height=Range(512, 1000, 1536))
    with pytest.raises(ProfileError, match=r"input 'sample'.*naming convention"):
        profile_for({"sample": ["s0", 4, "latent_height", "latent_width"]}, Geometry())
    with pytest.raises(ProfileError, match="no name"):
        profile_for({"sample": ["", 4]}, Geometry())
    with pytest.raises(ProfileError, match="not an integer"):  # 576 px -> 72 latents / 16 = 4.5
        dim_range("latent_height/16", Geometry.fixed(1, 576, 576))
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        Range(4, 2, 8)
    assert parse_dim("2B").coef == 2 and parse_dim("latent_height/4").div == 32


def test_vae_decoder_profile_takes_the_decode_batch():
    latents = {"latents": ["batch", 4, "latent_height", "latent_width"]}
    geometry = Geometry()
    assert geometry.for_component("unet_instantid") is geometry
    decoder = profile_for(latents, geometry.for_component("vae_decoder"))["latents"]
    assert decoder == ShapeRange((1, 4, 64, 64), (1, 4, 128, 128), (1, 4, 192, 192))
    wider = Geometry(decode_batch=Range(1, 1, 2)).for_component("vae_decoder")
    assert profile_for(latents, wider)["latents"].max == (2, 4, 192, 192)
    assert Geometry.fixed(4, 768, 768).for_component("vae_decoder").batch == Range(1, 1, 1)


def test_parse_range():
    assert parse_range("512:1024:1536") == Range(512, 1024, 1536) and parse_range("2") == Range(2, 2, 2)
    with pytest.raises(ProfileError, match="MIN:OPT:MAX"):
        parse_range("1:4")
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        parse_range("4:1:2")


def test_text_tokens_axis_is_dynamic_in_prompt_chunks():
    """The UNet's prompt tokens: one named axis (TEXT_TOKENS_AXIS), 77·k tokens, its range in Geometry."""
    from engine.profiles import TEXT_CHUNK, TEXT_TOKENS_AXIS

    text = ["2B", TEXT_TOKENS_AXIS, 2048]
    assert TEXT_TOKENS_AXIS == "text_tokens" and TEXT_CHUNK == 77
    assert shape_range(text, Geometry()) == ShapeRange((1, 77, 2048), (2, 77, 2048), (8, 231, 2048))
    longer = Geometry(text_tokens=parse_range("77:154:308"))
    assert dim_range(TEXT_TOKENS_AXIS, longer) == Range(77, 154, 308)
    fixed = Geometry.fixed(1, 1024, 1024)  # a fixed serving size keeps the prompt lengths open
    assert fixed.is_static and dim_range(TEXT_TOKENS_AXIS, fixed) == Range(77, 77, 231)
    profile = profile_for({"sample": UNET_SAMPLE, "text_tokens": text}, longer)
    assert solve_symbols({"text_tokens": text}, profile)[TEXT_TOKENS_AXIS] == Range(77, 154, 308)
    with pytest.raises(ProfileError, match="multiple of 77"):
        Geometry(text_tokens=Range(77, 77, 200))
