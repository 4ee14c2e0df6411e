"""Model dimensions read from the checkpoint files: the diffusers / transformers `config.json`s and
the tensor shapes of the adapter checkpoints. The built-in specs (export.specs) only give defaults,
hub ids and the architecture for `--random-init`.

    spec = checkpoint_spec(get_spec("sdxl"), weights_dir)   # a ModelSpec sized like the files

What comes from where (DIR laid out as the hub repositories, see export.weights):

    unet, vae, text_encoder{,_2}   stable-diffusion-xl-base-1.0/<part>/config.json
    controlnet                     InstantID/ControlNetModel/config.json
    image_encoder                  IP-Adapter/models/image_encoder/config.json
    instantid_resampler            InstantID/ip-adapter.bin shapes: image_proj.latents (1, Q, dim),
                                   proj_in.weight (dim, E), layers.<i>.* (depth), to_q.weight (heads·64, dim),
                                   layers.0.1.1.weight (dim·ff_mult, dim); output width = the UNet's
                                   cross_attention_dim (as the official InstantID loader sets it)
    ip_plus_resampler              ip-adapter-plus_sdxl_vit-h.safetensors shapes, the same way
    ip_image_proj                  ip-adapter_sdxl_vit-h.safetensors: proj.weight (K·C, D), norm.weight (C,)

Safetensors are read from their header only; torch pickles are memory-mapped (weights_only=True),
so no weight is read into memory. A part whose files are absent keeps the spec's default (the
loader that needs it raises the missing-file error); files that contradict each other raise
CheckpointMismatch naming both files and both numbers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from export.specs import ImageProjConfig, ModelSpec, ResamplerConfig, Source
from export.weights import WeightsNotFound, resolve

log = logging.getLogger("export")

PARTS = ("unet", "controlnet", "vae", "text", "image_encoder", "instantid", "ip_adapter", "ip_adapter_plus")
_DERIVED = "dims_from_checkpoints"
_HEAD_WIDTH = 64  # Resampler heads are 64 wide in every published checkpoint (diffusers' converter assumes it)


class CheckpointMismatch(ValueError):
    """Two checkpoint files disagree on a width (e.g. the face Resampler vs the UNet's cross-attention)."""


def read_config(source: Source, weights_dir: Path | None, name: str = "config.json") -> tuple[dict, Path]:
    """(config dict, its path) of `source`'s `name` (a diffusers / transformers folder)."""
    path = resolve(Source(source.repo_id, f"{source.path}/{name}" if source.path else name), weights_dir)
    config = json.loads(path.read_text())
    if "vision_config" in config and "image_size" not in config:  # a full CLIPConfig: its vision half
        config = {**config["vision_config"], "projection_dim": config.get("projection_dim", 512)}
    return config, path


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a checkpoint without reading its weights.

    `.safetensors`: flat keys (`image_proj.latents`); a torch pickle {'image_proj': {...}, ...}:
    the same flat `group.key` names.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    from export.weights import load_pickle

    try:
        state = load_pickle(path, mmap=True)
    except RuntimeError:  # a legacy (non-zip) pickle cannot be mapped: read it whole
        state = load_pickle(path)
    return {f"{group}.{key}": tuple(value.shape) for group, part in state.items() if isinstance(part, dict)
            for key, value in part.items()}


def _need(shapes: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{where}: no tensor {key!r}; expected an IP-Adapter / InstantID checkpoint "
                         f"(image_proj.* and ip_adapter.*)")
    return shapes[key]


def resampler_config(shapes: dict[str, tuple[int, ...]], where: str, dim_head: int = _HEAD_WIDTH) -> ResamplerConfig:
    """Perceiver Resampler geometry from the shapes of its tensors (keys without the `image_proj.` prefix).

    latents (1, Q, dim); proj_in.weight (dim, E); proj_out.weight (out, dim); depth = number of
    `layers.<i>`; heads = to_q rows / `dim_head`; ff_mult = layers.0.1.1 rows / dim.
    """
    _, queries, dim = _need(shapes, "latents", where)
    _, embedding = _need(shapes, "proj_in.weight", where)
    output, _ = _need(shapes, "proj_out.weight", where)
    depth = len({m.group(1) for key in shapes if (m := re.match(r"layers\.(\d+)\.", key))})
    inner = _need(shapes, "layers.0.0.to_q.weight", where)[0] if depth else dim_head
    if inner % dim_head:
        raise ValueError(f"{where}: Resampler attention is {inner} wide, not a multiple of the {dim_head}-wide "
                         "heads every published checkpoint uses; its head count cannot be read from the shapes")
    mult = _need(shapes, "layers.0.1.1.weight", where)[0] // dim if depth else 4
    return ResamplerConfig(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head, num_queries=queries,
                           embedding_dim=embedding, output_dim=output, ff_mult=mult)


def image_proj_config(shapes: dict[str, tuple[int, ...]], where: str) -> ImageProjConfig:
    """IP-Adapter plain projection from proj.weight (K·C, D) and norm.weight (C,)."""
    rows, embed = _need(shapes, "proj.weight", where)
    (width,) = _need(shapes, "norm.weight", where)
    if rows % width:
        raise ValueError(f"{where}: proj.weight has {rows} rows, not a multiple of the {width}-wide tokens")
    return ImageProjConfig(embed_dim=embed, cross_attention_dim=width, num_tokens=rows // width)


def projector_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The `image_proj.*` shapes of an adapter checkpoint, prefix removed."""
    return {key.removeprefix("image_proj."): shape for key, shape in tensor_shapes(path).items()
            if key.startswith("image_proj.")}


def check_width(found: int, wanted: int, what: str, found_where, wanted_where) -> None:
    """Raise CheckpointMismatch unless `found == wanted`, naming both files and numbers."""
    if found != wanted:
        raise CheckpointMismatch(
            f"{what}: {found_where} has {found} but {wanted_where} has {wanted}; the files come from different "
            "models: use the adapter made for this base model (or the base model it was trained on)")


def checkpoint_spec(spec: ModelSpec, weights_dir: Path | None = None, random_init: bool = False,
                    parts: tuple[str, ...] = PARTS) -> ModelSpec:
    """`spec` with every size read from the checkpoint files (see module docstring).

    random_init: the spec itself (it is the architecture). parts: which of PARTS to read (the hub is
    asked only for those; a local folder lacking a part keeps its default). Idempotent.
    """
    if random_init or spec.extra.get(_DERIVED):
        return spec
    repo = spec.sdxl_source.repo_id
    found, where = {}, {}

    def config(key: str, source: Source, name: str = "config.json"):
        try:
            found[key], where[key] = read_config(source, weights_dir, name)
        except WeightsNotFound as error:
            if weights_dir is None:
                raise
            log.debug("keeping the %s spec's %s sizes: %s", spec.name, key, error)

    if "unet" in parts:
        config("unet", Source(repo, "unet"))
    if "controlnet" in parts:
        config("controlnet", spec.controlnet_source)
    if "vae" in parts:
        config("vae", Source(repo, "vae"))
    if "text" in parts:
        config("text_encoder", Source(repo, "text_encoder"))
        if spec.text_encoder_2 is not None:  # SD1.5 has one text encoder
            config("text_encoder_2", Source(repo, "text_encoder_2"))
    if "image_encoder" in parts:
        config("image_encoder", spec.image_encoder_source)
    changes = dict(found)
    unet = found.get("unet", spec.unet)
    unet_where = where.get("unet", f"the {spec.name} spec's UNet")
    cross = unet["cross_attention_dim"]
    adapters = (("instantid", "instantid_resampler", spec.instantid_adapter_source),
                ("ip_adapter", "ip_image_proj", spec.ip_adapter_source),
                ("ip_adapter_plus", "ip_plus_resampler", spec.ip_adapter_plus_source))
    for part, field, source in adapters:
        if part not in parts:
            continue
        try:
            path = resolve(source, weights_dir)
        except WeightsNotFound as error:
            if weights_dir is None:
                raise
            log.debug("keeping the %s spec's %s sizes: %s", spec.name, field, error)
            continue
        shapes = projector_shapes(path)
        made = image_proj_config(shapes, str(path)) if part == "ip_adapter" else resampler_config(shapes, str(path))
        width = made.cross_attention_dim if part == "ip_adapter" else made.output_dim
        if "unet" in where:
            check_width(width, cross, "image-token width vs the UNet's cross_attention_dim", path, unet_where)
        changes[field] = made
        where[field] = path
    if "instantid_resampler" in changes:
        changes["face_embedding_dim"] = changes["instantid_resampler"].embedding_dim
    derived = dataclasses.replace(spec, **changes, extra={**spec.extra, _DERIVED: True})
    _check_consistent(derived, where)
    return derived


def _check_consistent(spec: ModelSpec, where: dict) -> None:
    """Cross-file checks: text widths vs the UNet's context and added embedding, image encoder vs adapters."""
    def at(key: str) -> str:
        return str(where.get(key, f"the {spec.name} spec's {key}"))

    def read(*keys: str) -> bool:  # both sides of a check come from files (a spec default is no evidence)
        return all(key in where for key in keys)

    unet, te1, te2 = spec.unet, spec.text_encoder, spec.text_encoder_2
    if read("unet", "text_encoder", "text_encoder_2"):
        check_width(te1["hidden_size"] + te2["hidden_size"], unet["cross_attention_dim"],
                    "text_encoder + text_encoder_2 hidden sizes vs the UNet's cross_attention_dim",
                    f"{at('text_encoder')} + {at('text_encoder_2')}", at("unet"))
    if read("unet", "text_encoder_2") and unet.get("addition_embed_type") == "text_time":
        text_embeds = text_embeds_dim(unet)
        check_width(te2["projection_dim"], text_embeds, "text_encoder_2 projection_dim vs the UNet's text_embeds "
                    "width (projection_class_embeddings_input_dim - 6 * addition_time_embed_dim)",
                    at("text_encoder_2"), at("unet"))
    control = spec.controlnet
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels"):
        if read("unet", "controlnet") and key in control and control[key] != unet[key]:
            raise CheckpointMismatch(f"ControlNet {key} {control[key]} ({at('controlnet')}) differs from the UNet's "
                                     f"{unet[key]} ({at('unet')}): its residuals cannot feed this UNet")
    image, plus, plain = spec.image_encoder, spec.ip_plus_resampler, spec.ip_image_proj
    if read("image_encoder", "ip_plus_resampler"):
        check_width(plus.embedding_dim, image["hidden_size"], "IP-Adapter Plus input width vs the image "
                    "encoder's hidden_size", where["ip_plus_resampler"], at("image_encoder"))
    if read("image_encoder", "ip_image_proj"):
        check_width(plain.embed_dim, image["projection_dim"], "IP-Adapter input width vs the image "
                    "encoder's projection_dim", where["ip_image_proj"], at("image_encoder"))


def count_cross_attn_layers(unet_config: dict) -> int:
    """Number of attn2 layers (= ip_scale entries, decoupled-attention layers) of an SDXL-style UNet
    config (70 for SDXL); `transformer_layers_per_block` and `layers_per_block` may be ints or lists."""
    levels = len(unet_config["down_block_types"])

    def per_level(value) -> list[int]:
        return list(value) if isinstance(value, (list, tuple)) else [value] * levels

    layers = per_level(unet_config.get("transformer_layers_per_block", 1))
    blocks = per_level(unet_config["layers_per_block"])
    down = sum(b * n for kind, b, n in zip(unet_config["down_block_types"], blocks, layers) if "CrossAttn" in kind)
    up = sum((b + 1) * n for kind, b, n in zip(unet_config["up_block_types"], reversed(blocks), reversed(layers))
             if "CrossAttn" in kind)
    mid = layers[-1] if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn" else 0
    return down + mid + up


def text_embeds_dim(unet_config: dict) -> int:
    """Width of the pooled text embedding the UNet adds (1280 for SDXL): its added-embedding input
    (projection_class_embeddings_input_dim) less the 6 time ids of addition_time_embed_dim each."""
    return unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
