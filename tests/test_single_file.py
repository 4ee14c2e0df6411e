"""SDXL bases in the forms they ship: a single `.safetensors` in the original (SGM / A1111 / ComfyUI)
key layout, a diffusers folder or a hub id (`python -m export.build --base`), with `--instantid` and
`--ip-adapter` for the adapters (export.single_file, export.build).

The tiny single file is written here by inverting diffusers' key conversion (`write_original_layout`:
diffusers names -> `model.diffusion_model.input_blocks…`, `first_stage_model.encoder.down…`,
`conditioner.embedders.0.transformer.text_model…`, OpenCLIP `conditioner.embedders.1.model.transformer.
resblocks…` with fused in_proj and a transposed text_projection), from tiny modules of another seed than
the tiny folder's, so a build that ignored the file would not pass. The oracle is diffusers' own
`StableDiffusionXLPipeline.from_single_file(FILE, config=<folder>, local_files_only=True)`. End to end,
IP-Adapter and InstantID builds from the file run in ONNX Runtime against the PyTorch baseline given the
same sources (fp32 latents within 1e-5 relative); the full-size SDXL layout is checked on meta tensors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# -- the original key layout, written from diffusers modules ----------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def unet_key(key: str, config) -> str:
    """diffusers UNet2DConditionModel key -> LDM `model.diffusion_model.` key (SDXL block layout)."""
    per = config.layers_per_block + 1
    for name, ldm in _UNET_TOP.items():
        if key.startswith(name + "."):
            return ldm + key[len(name):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per + index
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * per + index
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        level = int(m[1])
        has_attention = "CrossAttn" in config.up_block_types[level]
        return f"output_blocks.{level * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(key)


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> LDM `first_stage_model.` key."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    return key


def open_clip_state(encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP text tower names (fused in_proj, (hidden, proj) projection)."""
    state, out = encoder.state_dict(), {}
    layers = encoder.config.num_hidden_layers
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].T
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def original_layout(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """The four SDXL base modules' tensors under their original (SGM) names."""
    tensors = {f"model.diffusion_model.{unet_key(k, unet.config)}": v for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        if ".mid_block.attentions." in key and value.dim() == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        tensors[f"first_stage_model.{vae_key(key, levels)}"] = value
    for key, value in text_encoder.state_dict().items():
        tensors[f"conditioner.embedders.0.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    tensors.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_state(text_encoder_2).items()})
    return tensors


def write_original_layout(path: Path, unet, vae, text_encoder, text_encoder_2, extra: dict | None = None) -> Path:
    """Save the four SDXL base modules as one safetensors file in the original (SGM) key layout."""
    tensors = {**original_layout(unet, vae, text_encoder, text_encoder_2), **(extra or {})}
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


# -- fixtures ----------------------------------------------------------------------------------------
SEED = 100  # the tiny folder's modules use seeds 1..9: the file's weights differ from them
LATENT_TOL = 1e-5
SIZE = 64


def _tiny_base_modules() -> dict[str, torch.nn.Module]:
    from export import loaders
    from export.specs import TINY

    text = loaders.load_text_stack(TINY, random_init=True, seed=SEED + 4)
    return {"unet": loaders.load_unet(TINY, random_init=True, seed=SEED + 1),
            "vae": loaders.load_vae(TINY, random_init=True, seed=SEED + 3),
            "text_encoder": text.text_encoder, "text_encoder_2": text.text_encoder_2}


@pytest.fixture(scope="module")
def base_modules() -> dict[str, torch.nn.Module]:
    """The tiny SDXL base modules the single file is written from (not the tiny folder's weights)."""
    return _tiny_base_modules()


@pytest.fixture(scope="module")
def base_file(base_modules, tmp_path_factory) -> Path:
    """A tiny SDXL base as one safetensors in the original layout (+ OpenCLIP's unused logit_scale)."""
    path = tmp_path_factory.mktemp("single_file") / "tiny_sdxl_base.safetensors"
    return write_original_layout(path, **base_modules,
                                 extra={"conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052)})


def _max_abs(module: torch.nn.Module, reference: torch.nn.Module) -> float:
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape for k in ours)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


# -- loading -----------------------------------------------------------------------------------------
def test_single_file_loads_equal_to_diffusers_from_single_file(base_file, base_modules, tmp_path):
    """Each module loaded from the file equals diffusers' StableDiffusionXLPipeline.from_single_file with the
    shipped config folder, tensor for tensor, and the modules the file was written from."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModelWithProjection

    from export.single_file import base_folder, load_part

    folder = base_folder(base_file, "tiny", cache=tmp_path)
    pipe = StableDiffusionXLPipeline.from_single_file(str(base_file), config=str(folder), local_files_only=True)
    # diffusers tells the two text encoders apart by width (768 vs 1280 in SDXL); the tiny ones are both 32
    # wide, so its pipeline reads embedders.0 for both: its text_encoder_2 loader is given the file less those
    checkpoint = load_single_file_checkpoint(str(base_file), local_files_only=True)
    text_encoder_2 = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, {k: v for k, v in checkpoint.items() if not k.startswith(
            "conditioner.embedders.0.")}, subfolder="text_encoder_2", config=str(folder), local_files_only=True)
    oracle = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": text_encoder_2}
    for part, reference in oracle.items():
        module = load_part(folder / part)
        assert _max_abs(module, reference) == 0.0, part
        assert _max_abs(module, base_modules[part]) == 0.0, part
        if part in ("unet", "vae"):
            assert dict(module.config) == dict(reference.config), part
    assert pipe.scheduler.config["_class_name"] == "EulerDiscreteScheduler"
    prompt = "a photo of an astronaut"
    from transformers import CLIPTokenizer

    for name in ("tokenizer", "tokenizer_2"):
        ours = CLIPTokenizer.from_pretrained(folder / name)
        assert ours(prompt).input_ids == getattr(pipe, name)(prompt).input_ids
        assert ours.pad_token == getattr(pipe, name).pad_token


def test_full_size_sdxl_layout_fits_the_shipped_config():
    """The original layout of the full-size SDXL architecture (meta tensors: names and shapes only) passes the
    key check and converts onto export/configs/sdxl without a missing, extra or misshapen tensor."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from export.single_file import CONFIGS, PREFIXES, check_keys, convert
    from export.specs import SDXL

    with init_empty_weights():
        modules = dict(unet=UNet2DConditionModel.from_config(SDXL.unet), vae=AutoencoderKL.from_config(SDXL.vae),
                       text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL.text_encoder)),
                       text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL.text_encoder_2)))
    tensors = original_layout(**modules)
    check_keys(Path("sdxl.safetensors"), {key: tuple(value.shape) for key, value in tensors.items()})
    params = {}
    for part, prefix in PREFIXES.items():
        _, converted = convert(part, {k: v for k, v in tensors.items() if k.startswith(prefix)},
                               CONFIGS / "sdxl" / part, Path("sdxl.safetensors"))
        params[part] = sum(value.numel() for value in converted.values())
    assert round(params["unet"] / 1e9, 3) == 2.567  # SDXL's UNet (REFERENCE.md)
    assert params["text_encoder_2"] == sum(p.numel() for p in modules["text_encoder_2"].parameters())


def test_loaders_read_the_file_through_the_base_source(base_file, base_modules, tiny_weights):
    """`--base FILE` replaces the spec's sdxl_source; the normal loaders (and the sizes) then come from it,
    in the precision asked, while the adapters still come from the tiny folder."""
    from export import loaders
    from export.checkpoint_dims import checkpoint_spec
    from export.specs import TINY
    from export.weights import with_sources

    spec = checkpoint_spec(with_sources(TINY, base=str(base_file)), tiny_weights)
    assert spec.unet["cross_attention_dim"] == 64 and spec.text_encoder_2["hidden_size"] == 32
    unet = loaders.load_unet(spec, tiny_weights, dtype=torch.float16)
    assert unet.dtype == torch.float16
    assert _max_abs(unet.float(), base_modules["unet"]) <= 1e-3  # fp16 rounding only
    text = loaders.load_text_stack(spec, tiny_weights)
    assert _max_abs(text.text_encoder_2, base_modules["text_encoder_2"]) == 0.0
    assert text.tokenizer_2.pad_token == "!"
    assert loaders.load_scheduler_config(spec, tiny_weights)["_class_name"] == "EulerDiscreteScheduler"


def test_shipped_configs_are_the_specs(tmp_path):
    """export/configs/<model>/ are what write_configs makes of the spec (no drift), and diffusers reads them."""
    from diffusers import UNet2DConditionModel

    from export.single_file import CONFIGS, write_configs
    from export.specs import SDXL, TINY

    for spec in (SDXL, TINY):
        written = write_configs(spec, tmp_path / spec.name)
        files = sorted(p.relative_to(written) for p in written.rglob("*.json"))
        assert files == sorted(p.relative_to(CONFIGS / spec.name) for p in (CONFIGS / spec.name).rglob("*.json"))
        for rel in files:
            assert (written / rel).read_text() == (CONFIGS / spec.name / rel).read_text(), (spec.name, rel)
        config = UNet2DConditionModel.load_config(CONFIGS / spec.name / "unet")
        assert all(config[key] == value for key, value in spec.unet.items())


# -- end to end --------------------------------------------------------------------------------------
def _relative_error(value, reference) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def _request() -> tuple:
    from skimage import data

    return data.coffee(), "a cup on a table", None, dict(steps=2, guidance=5.0, ip_scale=0.6, seed=5, width=SIZE,
                                                          height=SIZE, num_images=1, scheduler="euler")


def test_build_from_single_file_matches_the_baseline(base_file, tiny_weights, tmp_path):
    """`--model tiny --base FILE --ip-adapter ADAPTER_FILE` (the rest from the tiny folder): ONNX Runtime latents
    equal the PyTorch baseline given the same sources (fp32), differ from the tiny folder's own base, and the
    manifest records both files with their sha256."""
    import hashlib

    from benchmarks.pipelines import IPAdapterBaseline
    from export.specs import TINY
    from export.weights import with_sources
    from fixtures_tiny import run_export_cli
    from runtime.pipelines import IPAdapterPipeline

    torch.set_num_threads(1)
    adapter = tiny_weights / TINY.ip_adapter_source.repo_name / TINY.ip_adapter_source.path
    out = tmp_path / "build"
    run_export_cli(["--model", "tiny", "--base", str(base_file), "--ip-adapter", str(adapter), "--weights",
                    str(tiny_weights), "--pipeline", "ip-adapter", "--stage", "onnx", "--precision", "fp32",
                    "--out", str(out)])
    flags = json.loads((out / "manifest.json").read_text())["components"]["unet_ip_adapter"]["onnx"]["export_flags"]
    for key, path in (("base", base_file), ("ip_adapter", adapter)):
        assert flags[key] == {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    image, prompt, negative, kwargs = _request()
    result = IPAdapterPipeline.from_build(out, "onnxruntime")(image, prompt, negative, return_latents=True, **kwargs)
    spec = with_sources(TINY, base=str(base_file), ip_adapter=str(adapter))
    expected = IPAdapterBaseline(spec, weights_dir=tiny_weights)(image, prompt, negative, **kwargs)
    folder_base = IPAdapterBaseline("tiny", weights_dir=tiny_weights)(image, prompt, negative, **kwargs)
    error = _relative_error(result.latents, expected.latents)
    change = _relative_error(result.latents, folder_base.latents)
    print(f"single-file base build vs baseline on the same modules: latents rel {error:.2e}; "
          f"vs the tiny folder's base {change:.2e}")
    assert error <= LATENT_TOL
    assert change > 100 * LATENT_TOL


def test_instantid_build_from_single_file_and_instantid_folder(base_file, tiny_weights, tmp_path):
    """`--model tiny --base FILE --instantid FOLDER` (a copy of the tiny InstantID folder elsewhere): the
    runtime's InstantID latents equal the baseline's given the same sources (fp32); the manifest lists the
    folder's files with their sha256."""
    import shutil

    import numpy as np

    from benchmarks.pipelines import InstantIDBaseline
    from export.specs import TINY
    from export.weights import sha256_of, with_sources
    from fixtures_tiny import run_export_cli
    from runtime.face import draw_kps
    from runtime.pipelines import InstantIDPipeline

    torch.set_num_threads(1)
    instantid = shutil.copytree(tiny_weights / "InstantID", tmp_path / "my_instantid")
    out = tmp_path / "build"
    run_export_cli(["--model", "tiny", "--base", str(base_file), "--instantid", str(instantid), "--weights",
                    str(tiny_weights), "--pipeline", "instantid", "--stage", "onnx", "--precision", "fp32",
                    "--out", str(out)])
    flags = json.loads((out / "manifest.json").read_text())["components"]["controlnet"]["onnx"]["export_flags"]
    assert flags["instantid"]["folder"] == "my_instantid"
    assert {"file": "ip-adapter.bin", "sha256": sha256_of(instantid / "ip-adapter.bin")} in flags["instantid"]["files"]
    embedding = np.random.default_rng(3).standard_normal(512).astype(np.float32) * 10
    kps_image = draw_kps(SIZE, SIZE, np.array([[22, 26], [42, 26], [32, 36], [24, 46], [40, 46]], np.float32))
    kwargs = dict(steps=2, guidance=5.0, ip_scale=0.8, controlnet_scale=0.8, seed=7, num_images=1)
    pipe = InstantIDPipeline.from_build(out, "onnxruntime")
    result = pipe.generate(embedding, kps_image, "a photo of a person", None, **kwargs)
    spec = with_sources(TINY, base=str(base_file), instantid=str(instantid))
    baseline = InstantIDBaseline(spec, weights_dir=tiny_weights, face_analyzer=pipe.face_analyzer)
    expected = baseline.generate(embedding, kps_image, "a photo of a person", None, **kwargs)
    error = _relative_error(result.latents, expected.latents)
    print(f"single-file base InstantID build vs baseline on the same modules: latents rel {error:.2e}")
    assert error <= LATENT_TOL


# -- the other forms and the flags -------------------------------------------------------------------
def test_folders_and_hub_ids_replace_the_sources(tiny_weights, tmp_path):
    """A diffusers folder as --base, the InstantID and IP-Adapter folders: the loaders read them with no
    --weights; the manifest record of a folder lists its files with their sha256."""
    from export import loaders
    from export.specs import TINY
    from export.weights import resolve, sha256_of, source_record, with_sources

    base = tiny_weights / TINY.sdxl_source.repo_name
    spec = with_sources(TINY, base=str(base), instantid=str(tiny_weights / "InstantID"),
                        ip_adapter=str(tiny_weights / "IP-Adapter"))
    assert resolve(spec.instantid_adapter_source) == tiny_weights / "InstantID" / "ip-adapter.bin"
    assert resolve(spec.image_encoder_source, folder=True) == tiny_weights / "IP-Adapter/models/image_encoder"
    assert _max_abs(loaders.load_vae(spec), loaders.load_vae(TINY, tiny_weights)) == 0.0
    record = source_record(str(base / "unet"), "--base")
    assert record["folder"] == "unet" and {"file": "config.json", "sha256": sha256_of(base / "unet/config.json")} \
        in record["files"]
    assert with_sources(TINY, base="someone/sdxl-finetune").sdxl_source.repo_id == "someone/sdxl-finetune"
    assert source_record("someone/sdxl-finetune", "--base") == {"repo": "someone/sdxl-finetune"}


def test_a_hub_id_offline_names_the_repository(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from export.checkpoint_dims import checkpoint_spec
    from export.specs import TINY
    from export.weights import WeightsNotFound, with_sources

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFound, match=r"someone/sdxl-finetune/unet/config.json is not in the hub cache.*"
                                              r"--base"):
        checkpoint_spec(with_sources(TINY, base="someone/sdxl-finetune"), None, parts=("unet",))


def _cli_error(capsys, *args: str) -> str:
    from export.build import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny", *args])
    return capsys.readouterr().err


def test_bad_files_get_one_clear_error(base_file, tiny_weights, tmp_path, capsys):
    """Unknown keys, an SD1.5 file, a file of another size, a missing config, wrong folders: one message
    naming what was found and what to pass."""
    from safetensors.torch import load_file

    from export.single_file import SingleFileError, base_folder

    tensors = load_file(str(base_file))
    odd = save_file_as(tmp_path / "odd.safetensors", {**tensors, "lora_unet_down.alpha": torch.ones(())})
    assert re.search(r"1 tensors that belong to no SDXL module, e.g. \['lora_unet_down.alpha'\].*--lora",
                     _cli_error(capsys, "--base", str(odd)))
    sd15 = save_file_as(tmp_path / "sd15.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(49408, 768)})
    message = _cli_error(capsys, "--base", str(sd15))
    assert "Stable Diffusion 1.x checkpoint (cond_stage_model.transformer.*" in message and "--model sd15" in message
    assert "no ['conditioner.embedders.0.transformer.*', 'conditioner.embedders.1.model.*']" in message
    from export.build import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "sdxl", "--base", str(base_file)])
    message = capsys.readouterr().err
    assert re.search(r"unet tensor \S+ is \(16, .*\) in the file but \(320, .*\) in the config.*--model tiny", message)
    with pytest.raises(SingleFileError, match=r"no shipped config for model 'no-such-model'.*\['sdxl', 'tiny'"):
        base_folder(base_file, "no-such-model")
    assert "no such file or folder, and not a hub id" in _cli_error(capsys, "--base", str(tmp_path / "none.safetensors"))
    assert "laid out as a diffusers pipeline" in _cli_error(capsys, "--base", str(tmp_path))
    assert "holds ControlNetModel/ and ip-adapter.bin" in _cli_error(capsys, "--instantid", str(tmp_path))
    plus = tiny_weights / "IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
    assert "an IP-Adapter Plus checkpoint, used by --pipeline ip-adapter-plus" in _cli_error(
        capsys, "--ip-adapter", str(plus), "--pipeline", "ip-adapter")
    assert "--base and --random-init exclude each other" in _cli_error(capsys, "--base", str(base_file),
                                                                        "--random-init")


def save_file_as(path: Path, tensors: dict) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path
