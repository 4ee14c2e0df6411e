"""SDXL base models shipped as one `.safetensors` file in the original key layout (SGM, A1111, ComfyUI):

    model.diffusion_model.*                 UNet         (LDM block names: input_blocks.4.1.…)
    first_stage_model.*                     VAE          (encoder.down.0.block.0.…)
    conditioner.embedders.0.transformer.*   text_encoder   (CLIP ViT-L, transformers names)
    conditioner.embedders.1.model.*         text_encoder_2 (OpenCLIP ViT-bigG: resblocks, in_proj, text_projection)

The model configs ship with the project (`export/configs/<model>/`, diffusers config JSONs; the
tokenizers are written from the CLIP vocabulary in the open_clip wheel), so nothing is downloaded.
`base_folder(file, model)` lays them out as a diffusers pipeline folder (model_index.json, unet/,
vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/) with a `single_file.json` naming the file;
that folder is the base's `Source`: tokenizers, scheduler and configs (hence every size) come from
it, and each module is converted from the file with diffusers' own key conversion
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) and loaded strictly: a missing, extra or misshapen tensor is an error.
The same folder is what diffusers' `from_single_file(FILE, config=folder)` takes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
MARKER = "single_file.json"
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}
_ROOTS = {  # what may follow each prefix (the rest is checked by the strict load)
    "unet": ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.", "out."),
    "vae": ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
    "text_encoder": ("text_model.",),
    "text_encoder_2": ("token_embedding.", "positional_embedding", "ln_final.", "text_projection", "transformer.",
                       "logit_scale", "attn_mask"),
}
_UNUSED = ("logit_scale", "attn_mask", "position_ids")  # in published files, not module weights
_SCHEDULE = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
             "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
             "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
             "logvar", "denoiser.sigmas", "denoiser.log_sigmas"}  # training buffers of the LDM/SGM wrappers
_EXPECTED = ("an SDXL base file in the original layout holds model.diffusion_model.*, first_stage_model.*, "
             "conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*")


_OTHER_MODEL = ("the file is another model size or architecture; pass the --model it was made for (e.g. --model "
                "sdxl for a full-size SDXL file, --model tiny for the tiny one)")


class SingleFileError(ValueError):
    """A single-file checkpoint that is not an SDXL base in the original layout, or does not fit the config."""


def is_single_file(path: Path | str) -> bool:
    """True for an existing `.safetensors` / `.ckpt` / `.pt` / `.bin` file (a base given as one file)."""
    path = Path(path)
    return path.is_file() and path.suffix in (".safetensors", ".ckpt", ".pt", ".bin")


def config_folder(model: str) -> Path:
    """The shipped diffusers config folder of `model` (export/configs/<model>)."""
    folder = CONFIGS / model
    if not (folder / "model_index.json").is_file():
        shipped = sorted(p.name for p in CONFIGS.iterdir() if (p / "model_index.json").is_file())
        raise SingleFileError(f"no shipped config for model {model!r} in {CONFIGS} (there are {shipped}): a "
                              "single-file base needs one; pass the base as a diffusers folder or hub id instead")
    return folder


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a safetensors header (no weight is read)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: only .safetensors single files are read (a pickled .ckpt can run code "
                              "when loaded); convert it to .safetensors, or pass the base as a diffusers folder")
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def describe(keys) -> str:
    """What kind of checkpoint a key set is, in words (for error messages)."""
    keys = list(keys)
    has = lambda prefix: any(key.startswith(prefix) for key in keys)  # noqa: E731
    if has("cond_stage_model.transformer."):
        return ("a Stable Diffusion 1.x checkpoint (cond_stage_model.transformer.*: one CLIP ViT-L text encoder), "
                "not an SDXL base: pass an SDXL base file, or build SD1.5 with --model sd15")
    if has("cond_stage_model.model."):
        return "a Stable Diffusion 2.x checkpoint (cond_stage_model.model.*: one OpenCLIP ViT-H text encoder)"
    if has("conditioner.embedders.0.model.") and not has(PREFIXES["text_encoder_2"]):
        return "an SDXL refiner checkpoint (conditioner.embedders.0.model.*: OpenCLIP only); pass the SDXL base"
    if has("down_blocks.") or has("unet.") or has("text_model."):
        return "a diffusers-layout file (down_blocks.* / text_model.*): pass its diffusers folder as --base instead"
    return "not a Stable Diffusion checkpoint in the original layout"


def check_keys(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise SingleFileError unless `shapes` are an SDXL base in the original layout (see module docstring)."""
    missing = [part for part, prefix in PREFIXES.items() if not any(k.startswith(prefix) for k in shapes)]
    if missing:
        raise SingleFileError(f"{path} is {describe(shapes)}: it has no {[PREFIXES[p] + '*' for p in missing]} "
                              f"({len(shapes)} tensors); {_EXPECTED}")
    unknown = [key for key in shapes if _part_of(key) is None and key not in _SCHEDULE
               and not key.startswith("model_ema.")]
    if unknown:
        raise SingleFileError(f"{path} has {len(unknown)} tensors that belong to no SDXL module, e.g. {unknown[:5]}; "
                              f"{_EXPECTED} (a LoRA goes to --lora, an adapter to --instantid / --ip-adapter)")


def _part_of(key: str) -> str | None:
    for part, prefix in PREFIXES.items():
        if key.startswith(prefix):
            return part if key[len(prefix):].startswith(_ROOTS[part]) else None
    return None


def base_folder(path: Path, model: str, cache: Path | None = None) -> Path:
    """A diffusers pipeline folder for the single-file base `path` with `model`'s shipped configs.

    Checks the file's keys and every tensor shape against the configs first (header only; no weight
    read). The folder (configs, tokenizers written from open_clip's vocabulary, `single_file.json`)
    is made once under `cache` (default: the temp dir), keyed by the file's path and the model.
    """
    path = Path(path).resolve()
    configs = config_folder(model)
    shapes = file_shapes(path)
    check_keys(path, shapes)
    for part in PREFIXES:
        convert(part, {key: torch.empty(shape, device="meta") for key, shape in shapes.items()
                       if _part_of(key) == part}, configs / part, path)
    key = hashlib.sha256(f"{path}|{model}|{_tree_digest(configs)}".encode()).hexdigest()[:16]
    folder = Path(cache or Path(tempfile.gettempdir()) / "instantrt-single-file") / f"{model}-{key}"
    if not (folder / MARKER).is_file():
        _write_folder(folder, configs, {"file": str(path), "model": model})
    return folder


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*.json")):
        digest.update(file.relative_to(folder).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()


def _write_folder(folder: Path, configs: Path, marker: dict) -> None:
    """Copy the configs, write the tokenizers and the marker into a scratch folder, then move it in place."""
    from export.tokenizer import write_clip_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name, dir=folder.parent))
    shutil.copytree(configs, scratch, dirs_exist_ok=True)
    write_clip_tokenizer(scratch / "tokenizer")
    write_clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    (scratch / MARKER).write_text(json.dumps(marker, indent=2))
    try:
        os.replace(scratch, folder)
    except OSError:  # another process made it first
        shutil.rmtree(scratch, ignore_errors=True)


def write_configs(spec, folder: Path) -> Path:
    """Write `spec`'s diffusers config JSONs (model_index.json and one folder per part) to `folder`:
    how export/configs/<model>/ was made; the spec's dicts with each class name, nothing else."""
    folder = Path(folder)
    classes = {"unet": ("diffusers", "UNet2DConditionModel", spec.unet),
               "vae": ("diffusers", "AutoencoderKL", spec.vae),
               "text_encoder": ("transformers", "CLIPTextModel", spec.text_encoder),
               "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", spec.text_encoder_2),
               "scheduler": ("diffusers", spec.scheduler["_class_name"], spec.scheduler)}
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    for part, (library, name, config) in classes.items():
        index[part] = [library, name]
        extra = {"_class_name": name} if library == "diffusers" else {"model_type": "clip_text_model"}
        target = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({**extra, **config}, indent=2, sort_keys=True) + "\n")
    (folder / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return folder


def weights_file(part_folder: Path) -> Path | None:
    """The single file behind a part folder of `base_folder` (e.g. <folder>/unet), else None."""
    marker = Path(part_folder).parent / MARKER
    return Path(json.loads(marker.read_text())["file"]) if marker.is_file() else None


def _model_class(part: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection}[part]


def _empty_model(part: str, config_dir: Path):
    """The part's module built from its config with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    cls = _model_class(part)
    with init_empty_weights():
        if part in ("unet", "vae"):
            return cls.from_config(cls.load_config(config_dir))
        return cls(cls.config_class.from_pretrained(config_dir))


def convert(part: str, state: dict[str, torch.Tensor], config_dir: Path, path: Path):
    """Original-layout tensors of one part (full keys) -> (empty module, diffusers state dict), checked.
    The tensors may be on the meta device (a header-only check of shapes).

    Raises SingleFileError naming the file, the config and the first missing / extra / misshapen keys.
    """
    from diffusers.loaders import single_file_utils as sf

    model = _empty_model(part, config_dir)
    if part == "unet":
        converted = sf.convert_ldm_unet_checkpoint(state, dict(model.config))
    elif part == "vae":
        converted = sf.convert_ldm_vae_checkpoint(state, dict(model.config))
    elif part == "text_encoder":
        converted = sf.convert_ldm_clip_checkpoint(state)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    else:
        converted = sf.convert_open_clip_checkpoint(model, state, prefix=PREFIXES[part])
    converted = {key: value for key, value in converted.items() if not key.endswith(_UNUSED)}
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if not key.endswith(_UNUSED)}
    where = f"{path} ({PREFIXES[part]}*) vs {config_dir / 'config.json'}"
    for key in (key for key in expected if key in converted):  # module order: conv_in first
        if tuple(converted[key].shape) != expected[key]:
            raise SingleFileError(f"{where}: {part} tensor {key} is {tuple(converted[key].shape)} in the file but "
                                  f"{expected[key]} in the config: {_OTHER_MODEL}")
    missing, extra = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or extra:
        raise SingleFileError(f"{where}: the {part} does not fit its config: missing {missing[:4]} "
                              f"({len(missing)}), unexpected {extra[:4]} ({len(extra)}): {_OTHER_MODEL}")
    return model, converted


def load_part(part_folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The module of `part_folder` (<base_folder>/unet, vae, text_encoder or text_encoder_2), loaded from
    its single file: only that part's tensors are read, converted, checked, and cast to `dtype`."""
    from safetensors import safe_open

    part_folder = Path(part_folder)
    part, path = part_folder.name, weights_file(part_folder)
    if part not in PREFIXES or path is None:
        raise SingleFileError(f"{part_folder} is not a part of a single-file base folder")
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if _part_of(key) == part}
    model, converted = convert(part, state, part_folder, path)
    model.load_state_dict({key: value.to(dtype) for key, value in converted.items()}, strict=False, assign=True)
    return model.eval().requires_grad_(False)
