"""Extra SDXL ControlNets beside the IdentityNet (canny, depth, pose, ...): `--controlnet NAME=PATH`.

    python -m export.build --model sdxl --controlnet canny=diffusers/controlnet-canny-sdxl-1.0 \
        --controlnet depth=/models/controlnet-depth-sdxl-1.0

Each one is exported as the component `controlnet_<NAME>` with the I/O of the IdentityNet except its
context, which is the text (as diffusers' StableDiffusionXLControlNetPipeline / MultiControlNetModel and
InstantID's full pipeline feed every ControlNet but the IdentityNet):

    sample float (2B, 4, latent_height, latent_width), timestep float32 (1,),
    text_tokens float (2B, text_tokens, 2048) [the UNet's text_tokens input, the same dynamic axis: 77·k tokens
                                               for a prompt of k chunks],
    control_image float (2B, 3, height, width) RGB in [0, 1] (diffusers' control image processor, no normalisation),
    text_embeds float (2B, 1280), time_ids float (2B, 6), conditioning_scale float32 (1,)
    -> down_residual_0..8, mid_residual      [the IdentityNet's names and shapes, already x conditioning_scale]

so the runtime sums its residuals with the IdentityNet's (runtime/controlnets.py). PATH is a diffusers
ControlNet folder (config.json + weights), or a hub id resolved as --instantid's (cache first). The
manifest records, per component, the source (hub id, or each file's sha256) under the export flags
(`controlnet`), and the build's ControlNets under metadata `controlnets` {NAME: component}.
SDXL family only: an SD1.5 model is refused with one line.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.profiles import TEXT_TOKENS_AXIS
from export.components import Component, _conditioning, residual_ios
from export.specs import Source

PREFIX = "controlnet_"
_NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")


class ControlNetSourceError(ValueError):
    """A --controlnet value that cannot be used; the message says what to give."""


@dataclass(frozen=True)
class ControlNetSource:
    """One `--controlnet NAME=PATH`: name (lower-case letters, digits, '_') and the folder or hub id."""

    name: str
    value: str

    @property
    def component(self) -> str:
        """The build's component: controlnet_<name>."""
        return PREFIX + self.name

    @classmethod
    def parse(cls, text: str) -> "ControlNetSource":
        """'canny=diffusers/controlnet-canny-sdxl-1.0' -> ControlNetSource; ControlNetSourceError otherwise."""
        name, sep, value = text.partition("=")
        if not sep or not value:
            raise ControlNetSourceError(f"--controlnet {text}: give NAME=PATH (e.g. canny=diffusers/controlnet-"
                                        "canny-sdxl-1.0 or canny=/models/controlnet-canny-sdxl-1.0)")
        if not _NAME.fullmatch(name):
            raise ControlNetSourceError(f"--controlnet {text}: the name {name!r} must be 1-32 lower-case letters, "
                                        "digits or '_' (it names the component controlnet_<name>)")
        return cls(name, value)

    def folder(self) -> Path:
        """The local diffusers folder (a hub id is fetched, cache first); ControlNetSourceError when absent."""
        from export.weights import SourceError, WeightsNotFound, locate, resolve

        try:
            where = locate(self.value, "--controlnet")
            path = resolve(Source(where), folder=True) if isinstance(where, str) else where
        except (SourceError, WeightsNotFound) as error:
            raise ControlNetSourceError(str(error)) from None
        if not (path / "config.json").is_file():
            raise ControlNetSourceError(f"--controlnet {self.name}={self.value}: {path} has no config.json; give a "
                                        "diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)")
        return path

    def record(self) -> dict:
        """What the manifest keeps: the hub id, or the folder's weight/config files with their sha256."""
        from export.weights import source_record

        return {"name": self.name, **source_record(self.value, "--controlnet")}


def check_sources(sources, model: str, spec) -> None:
    """ControlNetSourceError for duplicate names or a family without SDXL ControlNets (SD1.5)."""
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ControlNetSourceError(f"--controlnet names must differ, got {names}")
    if sources and not spec.added_conditioning:
        raise ControlNetSourceError(f"--controlnet: --model {model} is not an SDXL model; extra ControlNets are "
                                    "exported for the SDXL family only (tiny, sdxl)")


def load_controlnet(source: ControlNetSource, unet_config: dict, dtype: torch.dtype = torch.float32):
    """diffusers ControlNetModel from the source's folder, checked against the UNet it feeds:
    ControlNetSourceError when it is not an SDXL ControlNet of that UNet's geometry."""
    from diffusers import ControlNetModel

    path = source.folder()
    variant = "fp16" if dtype == torch.float16 and any(path.glob("*.fp16.safetensors")) else None
    controlnet = ControlNetModel.from_pretrained(path, variant=variant, torch_dtype=dtype).eval()
    config = controlnet.config
    wanted = {"block_out_channels": tuple(unet_config["block_out_channels"]),
              "cross_attention_dim": unet_config["cross_attention_dim"],
              "addition_embed_type": unet_config.get("addition_embed_type")}
    found = {"block_out_channels": tuple(config.block_out_channels),
             "cross_attention_dim": config.cross_attention_dim, "addition_embed_type": config.addition_embed_type}
    if found != wanted:
        raise ControlNetSourceError(f"--controlnet {source.name}={source.value} is not a ControlNet of this model's "
                                    f"UNet: it has {found}, the UNet {wanted}; give an SDXL ControlNet")
    return controlnet.to(dtype)


class TextControlNet(nn.Module):
    """A ControlNet whose context is the text tokens; conditioning_scale an input; 9 down + 1 mid residual."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, text_tokens, control_image, text_embeds, time_ids, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=text_tokens, controlnet_cond=control_image,
                                    conditioning_scale=conditioning_scale.to(sample.dtype),
                                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                                    return_dict=False)
        return (*down, mid)


def controlnet_component(name: str, controlnet: nn.Module) -> Component:
    """`controlnet_<name>` with the I/O of the module docstring (text_tokens as the UNet's)."""
    from engine.tensors import TensorSpec

    dtype = next(controlnet.parameters()).dtype
    config = controlnet.config
    c = _conditioning(config, dtype)
    inputs = (c["sample"], c["timestep"],
              TensorSpec("text_tokens", dtype, ("2B", TEXT_TOKENS_AXIS, config.cross_attention_dim)),
              TensorSpec("control_image", dtype, ("2B", 3, "height", "width")),
              c["text_embeds"], c["time_ids"], TensorSpec("conditioning_scale", torch.float32, (1,)))
    return Component(PREFIX + name, TextControlNet(controlnet).eval(), inputs, residual_ios(config, dtype))


def export_controlnets(out: Path, model: str, sources, unet_config: dict, dtype: torch.dtype, sizes: dict,
                       flags: dict) -> list[tuple[str, int, float, float]]:
    """Export each source to out/onnx/controlnet_<name>.onnx and record it (with its source) in the manifest;
    metadata `controlnets` gains {name: component}. Returns (component, params, load s, export s) per source."""
    from engine.manifest import record_onnx
    from export.onnx_export import export_component

    rows = []
    for source in sources:
        start = time.perf_counter()
        component = controlnet_component(source.name, load_controlnet(source, unet_config, dtype))
        loaded = time.perf_counter() - start
        seconds = export_component(component, out / "onnx" / f"{source.component}.onnx", sizes)
        record = record_onnx(out, model, source.component, export_seconds=round(seconds, 2),
                             export_flags={**flags, "controlnet": source.record()})
        rows.append((source.component, record.params, loaded, seconds))

    _remember(out, model, sources)
    return rows


def controlnet_programs(out: Path, model: str, sources, unet_config: dict, dtype: torch.dtype, torch_version: str,
                        precision: str) -> dict[str, dict]:
    """`--stage torch`: each source as out/torch/controlnet_<name>.pt2 (export.torch_programs); returns their
    manifest entries (metadata torch_programs) and records metadata `controlnets`."""
    from engine.manifest import sha256_files
    from export.torch_programs import program_entry

    entries = {}
    for source in sources:
        component = controlnet_component(source.name, load_controlnet(source, unet_config, dtype))
        entries[source.component] = program_entry(component, out, source.component, torch_version, precision,
                                                  {"controlnet": source.record()}, lambda path: sha256_files([path]))
    _remember(out, model, sources)
    return entries


def _remember(out: Path, model: str, sources) -> None:
    """metadata `controlnets` gains {name: component} for `sources`."""
    from engine.manifest import update_manifest

    def change(manifest) -> None:
        known = dict(manifest.metadata.get("controlnets", {}))
        known.update({source.name: source.component for source in sources})
        manifest.metadata["controlnets"] = dict(sorted(known.items()))

    if sources:
        update_manifest(out, model, change)


def write_tiny_controlnet(folder: Path, spec=None, seed: int = 20) -> Path:
    """A tiny SDXL ControlNet in diffusers' folder format (config.json + safetensors) with the tiny UNet's
    geometry and seeded random weights (its zero convolutions filled too, so it changes the result);
    returns `folder`. The IdentityNet's architecture: an SDXL ControlNet of the same UNet."""
    from export.loaders import load_controlnet as load_identitynet
    from export.specs import TINY

    spec = spec or TINY
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        load_identitynet(spec, seed=seed, random_init=True).save_pretrained(folder)
    return folder
