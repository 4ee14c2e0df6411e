"""LoRA files fused into the UNet and text encoders before export (no peft at run time).

Two layouts are read from `.safetensors` (a `.bin` is read with `weights_only=True`):

* kohya: `lora_unet_down_blocks_0_..._to_q.lora_down.weight` / `.lora_up.weight` / `.alpha`, and
  `lora_te1_` / `lora_te2_` (or `lora_te_`) for the two text encoders; names are converted with
  diffusers' own `_convert_non_diffusers_lora_to_diffusers` (SGM `input_blocks` names are mapped
  first with `_maybe_map_sgm_blocks_to_diffusers` when the UNet config is known);
* diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`,
  `text_encoder_2.`); alpha from `<module>.alpha` tensors, else the safetensors metadata
  `lora_adapter_metadata` (`<prefix>.lora_alpha`, `<prefix>.r`, `<prefix>.alpha_pattern`) that
  diffusers writes, else alpha = rank (scale 1).

Fusing: W (out, in[, kh, kw]) += scale * alpha / rank * (up (out, r[, 1, 1]) @ down (r, in[, kh, kw])),
computed in fp32 and cast back — what diffusers' `load_lora_weights` + `fuse_lora` does for Linear and
Conv2d (1x1 and kxk down, 1x1 up). Every pair must name a Linear/Conv2d weight of the given module;
anything else is a `LoraError` naming the format and a few of the keys.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# diffusers' intermediate names for attention processors -> the module's attribute
_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoraError(ValueError):
    """A LoRA file that cannot be fused: the message names the file, format and offending keys."""


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """'FILE' or 'FILE:SCALE' (a trailing ':number' is the scale; default 1.0)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                if Path(head).is_file() and not Path(text).is_file():
                    raise LoraError(f"--lora {text}: the scale '{tail}' is not a number; pass FILE or FILE:SCALE, "
                                    "e.g. style.safetensors:0.8") from None
        return cls(Path(text), 1.0)

    def record(self) -> dict:
        """{'file', 'sha256', 'scale'} for the build manifest."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"file": self.path.name, "sha256": digest, "scale": self.scale}


@dataclass
class LoraLayer:
    """One low-rank update of `module` (a dotted path inside `target`): down (r, in[, kh, kw]), up (out, r[, 1, 1])."""

    target: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float) -> torch.Tensor:
        """scale * alpha / rank * up @ down, fp32, shaped (out, in[, kh, kw]) flattened to 2-D."""
        return (scale * self.alpha / self.rank) * (self.up.float().flatten(1) @ self.down.float().flatten(1))


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist: pass --lora FILE[:SCALE] with an existing file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    from export.weights import load_pickle

    return load_pickle(path), {}


def detect_format(keys) -> str:
    """'kohya' or 'peft' from the key names; LoraError otherwise."""
    keys = list(keys)
    if keys and all(key.startswith(KOHYA_PREFIXES) for key in keys):
        return "kohya"
    if keys and all(key.split(".", 1)[0] in TARGETS for key in keys):
        return "peft"
    raise LoraError(f"unknown LoRA layout (neither kohya 'lora_unet_…' nor diffusers/PEFT 'unet.….lora_A'): "
                    f"keys such as {keys[:4]}")


def _module_path(rest: str) -> tuple[str, str] | None:
    """A diffusers/PEFT key without its target prefix -> (module path, 'down'|'up'), or None."""
    for suffix, kind in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                         (".lora_linear_layer.up.weight", "up"), ("_lora.down.weight", "down"),
                         ("_lora.up.weight", "up")):
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if suffix.startswith("_lora"):  # attention-processor naming: ...attn1.processor.to_q_lora
                parent, _, name = module.replace(".processor", "").rpartition(".")
                text = parent.endswith("self_attn")
                mapped = (_TEXT_PROCESSOR_NAMES if text else _PROCESSOR_NAMES).get(name)
                if mapped is None:
                    return None
                module = f"{parent}.{mapped}"
            return module, kind
    return None


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank/alpha_pattern: the value of the first key the module path ends with."""
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def parse_lora(path: Path, unet_config=None) -> tuple[str, list[LoraLayer]]:
    """(format, layers) of a LoRA file; see the module docstring. `unet_config` (the UNet's config, attribute
    access as `unet.config`) maps kohya's SGM names (`lora_unet_input_blocks_4_1_…`) to diffusers' blocks."""
    state, metadata = read_state_dict(path)
    state = {key: value for key, value in state.items() if "dora_scale" not in key}
    kind = detect_format(state)
    alphas: dict[tuple[str, str], float] = {}
    if kind == "kohya":
        from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                             _maybe_map_sgm_blocks_to_diffusers)

        if unet_config is not None and any("input_blocks" in key or "output_blocks" in key for key in state):
            state = _maybe_map_sgm_blocks_to_diffusers(state, unet_config)
        names = {key.split(".", 1)[0] for key in state}
        converted = {}
        leftovers = sorted(key for key in state if key.split(".", 1)[1] not in
                           ("lora_down.weight", "lora_up.weight", "alpha"))
        if leftovers:
            raise LoraError(f"{path}: kohya LoRA keys that are not lora_down/lora_up/alpha: {leftovers[:5]}")
        for name in sorted(names):
            pair = {f"{name}.lora_down.weight": state.get(f"{name}.lora_down.weight"),
                    f"{name}.lora_up.weight": state.get(f"{name}.lora_up.weight")}
            if any(value is None for value in pair.values()):
                raise LoraError(f"{path}: kohya LoRA {name} lacks its lora_down or lora_up weight")
            one, _ = _convert_non_diffusers_lora_to_diffusers(pair)
            for key, value in one.items():
                converted[key] = value
                target = key.split(".", 1)[0]
                found = _module_path(key.split(".", 1)[1])
                if found is not None and f"{name}.alpha" in state:
                    alphas[(target, found[0])] = float(state[f"{name}.alpha"])
        state = converted
    else:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        for key in [key for key in state if key.endswith(".alpha")]:
            target, rest = key.split(".", 1)
            alphas[(target, rest[: -len(".alpha")])] = float(state.pop(key))
    pairs: dict[tuple[str, str], dict] = {}
    unknown = []
    for key, value in state.items():
        target, rest = key.split(".", 1)
        found = _module_path(rest)
        if found is None:
            unknown.append(key)
            continue
        pairs.setdefault((target, found[0]), {})[found[1]] = value
    if unknown:
        raise LoraError(f"{path} ({kind} format): {len(unknown)} keys are not LoRA weights of a module, "
                        f"e.g. {unknown[:5]}")
    layers = []
    for (target, module), pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            raise LoraError(f"{path} ({kind} format): {target}.{module} has only its {sorted(pair)} weight")
        rank = pair["down"].shape[0]
        alpha = alphas.get((target, module))
        if alpha is None and kind == "peft":
            alpha = _pattern_value(config.get(f"{target}.alpha_pattern"), module, config.get(f"{target}.lora_alpha"))
            r = _pattern_value(config.get(f"{target}.rank_pattern"), module, config.get(f"{target}.r"))
            alpha = None if alpha is None else float(alpha) * rank / float(r or rank)  # alpha/r as peft scales it
        layers.append(LoraLayer(target, module, pair["down"], pair["up"], float(rank if alpha is None else alpha)))
    return kind, layers


def _weight(model: torch.nn.Module, module: str) -> torch.Tensor:
    """The weight at `module`; 'text_model.' is dropped where the CLIP text model has no such level
    (transformers 5 flattens CLIPTextModel). AttributeError if there is none."""
    if module.startswith("text_model.") and not hasattr(model, "text_model"):
        module = module[len("text_model."):]
    return model.get_submodule(module).weight


@torch.no_grad()
def fuse_loras(modules: dict[str, torch.nn.Module], loras, unet_config=None) -> int:
    """Fuse each LoraSpec of `loras` into `modules` ({'unet': …, 'text_encoder': …, 'text_encoder_2': …}) in
    place; layers whose target is not in `modules` are skipped (e.g. text-encoder layers when fusing
    only the UNet). `unet_config`: see `parse_lora`. Returns the number of weights changed; LoraError for keys
    that name no weight (then nothing of that file is fused)."""
    changed = 0
    for lora in loras:
        kind, layers = parse_lora(lora.path, unet_config)
        resolved, missing = [], []
        for layer in layers:  # resolve every layer first: a bad file changes nothing
            if layer.target not in modules:
                continue
            try:
                weight = _weight(modules[layer.target], layer.module)
            except AttributeError:
                missing.append(f"{layer.target}.{layer.module}")
                continue
            if layer.up.shape[0] != weight.shape[0] or layer.down[0].numel() != weight[0].numel():
                raise LoraError(f"{lora.path} ({kind} format): {layer.target}.{layer.module} LoRA is "
                                f"{tuple(layer.up.shape)} @ {tuple(layer.down.shape)}, the weight is "
                                f"{tuple(weight.shape)}: made for another model?")
            resolved.append((layer, weight))
        if missing:
            raise LoraError(f"{lora.path} ({kind} format): {len(missing)} LoRA layers name no module weight of this "
                            f"model, e.g. {missing[:5]}")
        for layer, weight in resolved:
            delta = layer.delta(lora.scale).reshape(weight.shape)
            weight.copy_((weight.float() + delta).to(weight.dtype))
            changed += 1
    return changed
