"""IP-Adapter scale per UNet block (InstantStyle), as diffusers' `pipe.set_ip_adapter_scale` takes it.

    ip_scale=0.6                                                   # λ on every cross-attention layer
    ip_scale={"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}   # per block
    ip_scale="style"                                               # a preset: InstantStyle's style only

A block dict names UNet blocks the way diffusers does (loaders/unet_loader_utils.py
`_maybe_expand_lora_scales_for_one_adapter`, called with default_scale=0.0 by IPAdapterMixin):
  - keys "down", "mid", "up"; "down"/"up" map to a number (every block of that side) or to a dict
    {"block_<i>": number | [one number per transformer layer of that block]}; "mid" is a number (or a
    one-element list);
  - a number for a block covers each of its transformer layers (`attentions.<j>`), a list gives one
    value per transformer layer (SDXL: 2 per down block, 3 per up block), and every transformer block
    of that layer (SDXL: up to 10, `transformer_blocks.<k>.attn2`) gets that value;
  - what the dict does not name gets 0.0 (not the float default of `ip_scale`: InstantStyle's point).
Only blocks with cross-attention exist (SDXL: down.block_1, down.block_2, mid, up.block_0, up.block_1;
SD1.5: down.block_0..2, mid, up.block_1..3); another name is one error listing the valid ones
(diffusers ignores a down/up block without attention silently; here it is refused).

The names of the UNet's cross-attention layers, in the order of the engines' `ip_scale` (L,) input
(export/adapters.py `cross_attention_layers`: `unet.attn_processors` order, down, up, then mid), are
a model fact of the build (`cross_attention_layers`), or derived from a UNet config
(`cross_attention_layer_names`).
"""
from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PRESETS: dict[str, dict] = {
    # InstantStyle (Wang et al. 2024): up_blocks.0.attentions.1 carries style, down_blocks.2.attentions.1 layout
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "style_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}
SIDES = ("down", "mid", "up")
_BLOCK = re.compile(r"block_(\d+)$")
_LAYER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.|mid_block\.attentions\.0\.")


class BlockScaleError(ValueError):
    """A block-scale dict or preset that does not fit its rules or this UNet; the message says what to give."""


@dataclass(frozen=True)
class BlockScales:
    """A validated block dict, hashable (a loop setting): entries ((block, values), ...) sorted, where
    block is 'down.block_2' / 'up.block_0' / 'mid' / 'down' / 'up' (a whole side) and values a float
    or a tuple (one per transformer layer). `preset`: the name it was given by, if any (not compared)."""

    entries: tuple[tuple[str, float | tuple[float, ...]], ...]
    preset: str | None = None

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockScales) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def as_dict(self) -> dict:
        """The diffusers form: {"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": ...}."""
        out: dict[str, Any] = {}
        for block, values in self.entries:
            value = list(values) if isinstance(values, tuple) else values
            side, _, name = block.partition(".")
            if name:
                out.setdefault(side, {})[name] = value
            else:
                out[side] = value
        return out

    def __str__(self) -> str:
        text = json.dumps(self.as_dict(), separators=(",", ":"))
        return f"{self.preset} {text}" if self.preset else text

    def __repr__(self) -> str:
        return f"BlockScales({self})"

    def layer_scales(self, layer_names: Sequence[str]) -> tuple[float, ...]:
        """One λ per cross-attention layer, in `layer_names`' order; BlockScaleError for a block (or a
        list length) this UNet does not have, naming the valid blocks."""
        layout = block_layout(layer_names)
        values: dict[str, float] = {}  # 'down_blocks.2.attentions.1' -> λ
        for block, given in self.entries:
            targets = _targets(block, layout, self.preset)
            for target in targets:
                count = layout[target]
                if isinstance(given, tuple) and len(given) not in (1, count):
                    raise BlockScaleError(f"ip_scale: {target} has {count} transformer layers, got {len(given)} "
                                          f"values: give one number or a list of {count}. {describe(layout)}")
                per_layer = given * count if isinstance(given, tuple) and len(given) == 1 else (
                    given if isinstance(given, tuple) else (given,) * count)
                prefix = _prefix(target)
                for j, value in enumerate(per_layer):
                    values[prefix if target == "mid" else f"{prefix}.attentions.{j}"] = float(value)
        return tuple(values.get(_layer_key(name), 0.0) for name in layer_names)


def _prefix(block: str) -> str:
    if block == "mid":
        return "mid_block.attentions.0"
    side, name = block.split(".")
    return f"{side}_blocks.{name.removeprefix('block_')}"


def _layer_key(name: str) -> str:
    """'down_blocks.2.attentions.1.transformer_blocks.3.attn2.processor' -> 'down_blocks.2.attentions.1'."""
    match = _LAYER.match(name)
    if not match:
        raise BlockScaleError(f"cross-attention layer {name!r} is not in a down, mid or up block of a UNet")
    return match.group(0).rstrip(".")


def block_layout(layer_names: Sequence[str]) -> dict[str, int]:
    """{'down.block_1': transformer layers, ..., 'mid': 1, 'up.block_0': ...} of the blocks with cross-attention."""
    layers: dict[str, set[int]] = {}
    for name in layer_names:
        match = _LAYER.match(name)
        if not match:
            raise BlockScaleError(f"cross-attention layer {name!r} is not in a down, mid or up block of a UNet")
        if match.group(1):
            block = f"{match.group(1).removesuffix('_blocks')}.block_{match.group(2)}"
            layers.setdefault(block, set()).add(int(match.group(3)))
        else:
            layers.setdefault("mid", set()).add(0)
    return {block: len(found) for block, found in sorted(layers.items(), key=lambda kv: _order(kv[0]))}


def _order(block: str) -> tuple:
    side, _, name = block.partition(".")
    return SIDES.index(side), int(name.removeprefix("block_") or 0)


def describe(layout: Mapping[str, int]) -> str:
    """'valid blocks: down.block_1 (2 layers), ..., mid (1), ...' for error messages."""
    blocks = ", ".join(f"{block} ({count} transformer layer{'s' if count > 1 else ''})"
                       for block, count in layout.items())
    return f"This UNet's blocks with cross-attention: {blocks}"


def _targets(block: str, layout: Mapping[str, int], preset: str | None) -> list[str]:
    if block in ("down", "up"):
        return [name for name in layout if name.startswith(block + ".")]
    if block not in layout:
        why = (f"the preset {preset!r} is made for SDXL's block layout" if preset else f"ip_scale names {block}")
        raise BlockScaleError(f"{why}, which this UNet has no cross-attention in. {describe(layout)}. Give "
                              "a block dict over those blocks instead")
    return [block]


def parse_block_scales(value: Any, ge: float = 0.0, le: float = math.inf) -> BlockScales:
    """A preset name or a diffusers block dict -> BlockScales; BlockScaleError saying what is wrong.
    Values must be numbers in ge..le (the request's bounds)."""
    if isinstance(value, BlockScales):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise BlockScaleError(f"ip_scale {value!r} is not a preset: use one of {', '.join(PRESETS)}, a number, "
                                  "one number per cross-attention layer, or a block dict such as "
                                  + json.dumps(PRESETS["style_layout"]))
        return _parse(PRESETS[value], ge, le, value)
    if not isinstance(value, Mapping):
        raise BlockScaleError(f"ip_scale must be a number, a list, a block dict or a preset name, got "
                              f"{type(value).__name__}")
    return _parse(value, ge, le, None)


def _parse(value: Mapping, ge: float, le: float, preset: str | None) -> BlockScales:
    unknown = [str(key) for key in value if key not in SIDES]
    if unknown:
        raise BlockScaleError(f"ip_scale block dict: unknown key(s) {', '.join(unknown)}; the keys are down, mid "
                              "and up, e.g. " + json.dumps(PRESETS["style_layout"]))
    entries = []
    for side in SIDES:
        if side not in value:
            continue
        given = value[side]
        if side == "mid":
            if isinstance(given, (list, tuple)) and len(given) != 1:
                raise BlockScaleError(f"ip_scale: mid has one transformer layer, got {len(given)} values")
            entries.append(("mid", _number("mid", given[0] if isinstance(given, (list, tuple)) else given, ge, le)))
        elif isinstance(given, Mapping):
            for name, scale in given.items():
                if not isinstance(name, str) or not _BLOCK.match(name):
                    raise BlockScaleError(f"ip_scale: {side} block {name!r} is not named block_<i> (e.g. block_0)")
                entries.append((f"{side}.{name}", _values(f"{side}.{name}", scale, ge, le)))
        else:
            entries.append((side, _values(side, given, ge, le)))
    return BlockScales(tuple(sorted(entries, key=lambda e: _order(e[0]))), preset)


def _values(where: str, given: Any, ge: float, le: float) -> float | tuple[float, ...]:
    if isinstance(given, (list, tuple)):
        if not given:
            raise BlockScaleError(f"ip_scale: {where} has an empty list: give a number or one per transformer layer")
        return tuple(_number(where, v, ge, le) for v in given)
    return _number(where, given, ge, le)


def _number(where: str, value: Any, ge: float, le: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise BlockScaleError(f"ip_scale: {where} must be a finite number (or a list of them), got {value!r}")
    if not ge <= float(value) <= le:
        raise BlockScaleError(f"ip_scale: {where}={float(value)} is outside {ge:g}..{le:g}")
    return float(value)


def cross_attention_layer_names(unet_config: Mapping[str, Any]) -> list[str]:
    """The attn2 processor names of a diffusers UNet2DConditionModel config, in `unet.attn_processors`
    order (down blocks, up blocks, then the mid block: the order the UNet registers its modules)."""
    down_types, up_types = unet_config["down_block_types"], unet_config["up_block_types"]
    levels = len(down_types)

    def per_level(value) -> list[int]:
        return list(value) if isinstance(value, (list, tuple)) else [value] * levels

    depth = per_level(unet_config.get("transformer_layers_per_block", 1))
    blocks = per_level(unet_config["layers_per_block"])
    up_depth = per_level(unet_config.get("reverse_transformer_layers_per_block") or list(reversed(depth)))
    names = []
    for i, kind in enumerate(down_types):
        if "CrossAttn" in kind:
            names += [f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2.processor"
                      for j in range(blocks[i]) for k in range(depth[i])]
    up_blocks = list(reversed(blocks))
    for i, kind in enumerate(up_types):
        if "CrossAttn" in kind:
            names += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2.processor"
                      for j in range(up_blocks[i] + 1) for k in range(up_depth[i])]
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        names += [f"mid_block.attentions.0.transformer_blocks.{k}.attn2.processor" for k in range(depth[-1])]
    return names
