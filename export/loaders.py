"""Build the PyTorch modules of a model from its spec: from checkpoints, or random (`random_init`).

Every loader takes `weights_dir` (a local folder laid out like the hub repositories, or None for
the hub) and `random_init` (the real architecture with seeded random weights, no files read).
Pickled checkpoints are read with `torch.load(weights_only=True)` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from export.adapters import ImageProj, Resampler
from export.single_file import load_part, weights_file
from export.specs import ModelSpec, Source
from export.weights import load_pickle, resolve


@dataclass
class TextStack:
    """The tokenizers and text encoders: SDXL's two, or SD1.5's one (`tokenizer_2`, `text_encoder_2` None)."""

    tokenizer: object
    tokenizer_2: object | None
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module | None

    def pairs(self) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, encoder) for every text encoder, in order."""
        pairs = [(self.tokenizer, self.text_encoder)]
        return pairs if self.text_encoder_2 is None else [*pairs, (self.tokenizer_2, self.text_encoder_2)]


def _seeded(seed: int):
    torch.manual_seed(seed)


def _fill_zero_init(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised tensors (ControlNet zero convs, norm biases) small random values,
    so random-weight models exercise every path (a zero conv would make residuals vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def _finish(module: torch.nn.Module, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _diffusers_model(cls, config: dict, source: Source, weights_dir, random_init, seed, dtype, device):
    if random_init:
        _seeded(seed)
        return _finish(_fill_zero_init(cls.from_config(config), seed), dtype, device)
    path = resolve(source, weights_dir, folder=True)
    if weights_file(path) is not None:  # a part of a single-file base (export.single_file)
        return _finish(load_part(path, dtype), dtype, device)
    variant = "fp16" if dtype == torch.float16 and any(path.glob("*.fp16.safetensors")) else None
    return _finish(cls.from_pretrained(path, variant=variant, torch_dtype=dtype), dtype, device)


def load_unet(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False,
              dtype: torch.dtype = torch.float32, device="cpu", seed: int = 1):
    """SDXL UNet2DConditionModel (plain processors; attach adapters with `attach_ip_adapter`)."""
    from diffusers import UNet2DConditionModel

    source = Source(spec.sdxl_source.repo_id, "unet")
    return _diffusers_model(UNet2DConditionModel, spec.unet, source, weights_dir, random_init, seed, dtype, device)


def load_controlnet(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False,
                    dtype: torch.dtype = torch.float32, device="cpu", seed: int = 2):
    """InstantID IdentityNet: a full SDXL ControlNetModel."""
    from diffusers import ControlNetModel

    return _diffusers_model(ControlNetModel, spec.controlnet, spec.controlnet_source, weights_dir, random_init,
                            seed, dtype, device)


def load_vae(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False,
             dtype: torch.dtype = torch.float32, device="cpu", seed: int = 3, fp16_fix: bool = False):
    """AutoencoderKL; `fp16_fix` takes the fp16-safe SDXL VAE (else run it in fp32)."""
    from diffusers import AutoencoderKL

    if fp16_fix:
        source = Source(spec.vae_fp16_fix_source.repo_id, "")
    else:
        source = Source(spec.sdxl_source.repo_id, "vae")
    return _diffusers_model(AutoencoderKL, spec.vae, source, weights_dir, random_init, seed, dtype, device)


def _clip_text(cls, config: dict, source: Source, weights_dir, random_init, seed, dtype, device):
    from transformers import CLIPTextConfig

    if random_init:
        _seeded(seed)
        return _finish(cls(CLIPTextConfig(**config)), dtype, device)
    path = resolve(source, weights_dir, folder=True)
    if weights_file(path) is not None:  # a part of a single-file base (export.single_file)
        return _finish(load_part(path, dtype), dtype, device)
    return _finish(cls.from_pretrained(path, dtype=dtype), dtype, device)


TOKENIZER_PADS = {"tokenizer": None, "tokenizer_2": "!"}  # SDXL's second tokenizer pads with '!'


def load_tokenizers(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False) -> tuple:
    """The CLIP tokenizers, one per text encoder (SDXL: two, SD1.5: one); with `random_init` they
    are written from open_clip's BPE vocabulary."""
    from transformers import CLIPTokenizer

    names = [encoder.replace("text_encoder", "tokenizer") for encoder in spec.text_encoders]
    if random_init:
        import tempfile

        from export.tokenizer import EOS, write_clip_tokenizer

        with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as tmp:  # read whole by from_pretrained
            return tuple(CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / name,
                                                                            pad_token=TOKENIZER_PADS[name] or EOS))
                         for name in names)
    repo = spec.sdxl_source.repo_id
    return tuple(CLIPTokenizer.from_pretrained(resolve(Source(repo, name), weights_dir, folder=True))
                 for name in names)


def load_text_stack(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False,
                    dtype: torch.dtype = torch.float32, device="cpu", seed: int = 4) -> TextStack:
    """Tokenizers + CLIPTextModel (+ CLIPTextModelWithProjection when the spec has a second encoder)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    repo = spec.sdxl_source.repo_id
    tokenizers = load_tokenizers(spec, weights_dir, random_init)
    text_encoder = _clip_text(CLIPTextModel, spec.text_encoder, Source(repo, "text_encoder"), weights_dir,
                              random_init, seed, dtype, device)
    if spec.text_encoder_2 is None:
        return TextStack(tokenizers[0], None, text_encoder, None)
    text_encoder_2 = _clip_text(CLIPTextModelWithProjection, spec.text_encoder_2, Source(repo, "text_encoder_2"),
                                weights_dir, random_init, seed + 1, dtype, device)
    return TextStack(*tokenizers, text_encoder, text_encoder_2)


def load_image_encoder(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False,
                       dtype: torch.dtype = torch.float32, device="cpu", seed: int = 6):
    """CLIPVisionModelWithProjection (OpenCLIP ViT-H/14 for the `*_vit-h` adapters)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if random_init:
        _seeded(seed)
        return _finish(CLIPVisionModelWithProjection(CLIPVisionConfig(**spec.image_encoder)), dtype, device)
    path = resolve(spec.image_encoder_source, weights_dir, folder=True)
    return _finish(CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype), dtype, device)


def read_adapter_checkpoint(path: Path) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) state dicts from an adapter checkpoint.

    `.bin`: a torch pickle {'image_proj': …, 'ip_adapter': …}, read with weights_only=True.
    `.safetensors`: flat keys prefixed `image_proj.` / `ip_adapter.`.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        flat = load_file(path)
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            group, _, rest = key.partition(".")
            if group not in state:
                raise ValueError(f"{path}: unexpected key {key!r}; expected 'image_proj.*' or 'ip_adapter.*'")
            state[group][rest] = value
    else:
        state = load_pickle(path)
    missing = {"image_proj", "ip_adapter"} - set(state)
    if missing:
        raise ValueError(f"{path} is not an IP-Adapter checkpoint: it lacks {sorted(missing)}")
    return state["image_proj"], state["ip_adapter"]


def random_ip_state(unet, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random `to_k_ip`/`to_v_ip` weights for every attn2 layer of `unet`, keyed as the checkpoints are."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    std = cross**-0.5
    state = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                state[f"{index}.{kind}.weight"] = torch.randn(hidden, cross, generator=generator) * std
    return state


def _projector(module: torch.nn.Module, state: dict | None, dtype, device) -> torch.nn.Module:
    if state is not None:
        module.load_state_dict(state, strict=True)
    return _finish(module, dtype, device)


def load_instantid_adapter(spec: ModelSpec, unet, weights_dir: Path | None = None, random_init: bool = False,
                           dtype: torch.dtype = torch.float32, device="cpu", seed: int = 8):
    """InstantID `ip-adapter.bin` -> (face Resampler module, ip_adapter state dict for `attach_ip_adapter`).

    The Resampler is sized from the checkpoint's tensors (the spec's geometry only with `random_init`);
    its output width must equal `unet`'s cross_attention_dim (CheckpointMismatch otherwise).
    """
    _seeded(seed)
    if random_init:
        return _projector(Resampler(spec.instantid_resampler), None, dtype, device), random_ip_state(unet, seed)
    path = resolve(spec.instantid_adapter_source, weights_dir)
    proj_state, ip_state = read_adapter_checkpoint(path)
    return _projector(_sized_projector(path, proj_state, unet, resampler=True), proj_state, dtype, device), ip_state


def load_ip_adapter(spec: ModelSpec, unet, plus: bool, weights_dir: Path | None = None, random_init: bool = False,
                    dtype: torch.dtype = torch.float32, device="cpu", seed: int = 9):
    """IP-Adapter (SDXL or SD1.5; plain: ImageProj, Plus: Resampler) -> (projector module, ip_adapter state dict).

    The projector is sized from the checkpoint's tensors (the spec's geometry only with `random_init`).
    """
    _seeded(seed)
    if random_init:
        module = Resampler(spec.ip_plus_resampler) if plus else ImageProj(spec.ip_image_proj)
        return _projector(module, None, dtype, device), random_ip_state(unet, seed + 1)
    path = resolve(spec.ip_adapter_plus_source if plus else spec.ip_adapter_source, weights_dir)
    proj_state, ip_state = read_adapter_checkpoint(path)
    return _projector(_sized_projector(path, proj_state, unet, resampler=plus), proj_state, dtype, device), ip_state


def _sized_projector(path: Path, proj_state: dict, unet, resampler: bool) -> torch.nn.Module:
    """Resampler / ImageProj sized from the checkpoint's `image_proj` tensors (export.checkpoint_dims);
    its token width must be `unet`'s cross_attention_dim (unchecked when `unet` is None)."""
    from export.checkpoint_dims import check_width, image_proj_config, resampler_config

    shapes = {key: tuple(value.shape) for key, value in proj_state.items()}
    config = resampler_config(shapes, str(path)) if resampler else image_proj_config(shapes, str(path))
    if unet is not None:
        width = config.output_dim if resampler else config.cross_attention_dim
        check_width(width, unet.config.cross_attention_dim, "image-token width vs the UNet's cross_attention_dim",
                    path, "the UNet's config.json")
    return Resampler(config) if resampler else ImageProj(config)


def load_scheduler_config(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False) -> dict:
    """scheduler_config.json of the SDXL base repository (the spec's copy with `random_init`)."""
    import json

    if random_init:
        return dict(spec.scheduler)
    folder = resolve(Source(spec.sdxl_source.repo_id, "scheduler"), weights_dir, folder=True)
    return json.loads((folder / "scheduler_config.json").read_text())


def face_models_dir(spec: ModelSpec, weights_dir: Path | None, face_models: Path | None = None) -> Path:
    """Folder with the antelopev2 detector + recogniser: `face_models`, else `weights_dir/antelopev2`."""
    from export.weights import WeightsNotFound

    folder = Path(face_models) if face_models else (Path(weights_dir) / spec.face_models_dir if weights_dir else None)
    needed = (spec.face_detector_file, spec.face_recognizer_file)
    if folder is None or not all((folder / name).is_file() for name in needed):
        raise WeightsNotFound(f"face models {list(needed)} not found in {folder}: insightface's antelopev2 pack "
                              "cannot be downloaded automatically; unpack it and pass --face-models DIR")
    return folder
