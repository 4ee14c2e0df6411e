"""Write the `tiny-sd15` model: SD1.5 + IP-Adapter, seeded, in the on-disk formats of the real checkpoints.

    python -m export.tiny_sd15 DIR [--seed N]

DIR then holds what `--weights DIR` expects for `--model sd15` (at tiny width):

    stable-diffusion-v1-5/{unet,vae,text_encoder,tokenizer,scheduler}/     diffusers / transformers folders
    IP-Adapter/models/ip-adapter{,-plus}_sd15.safetensors                   image_proj.* + ip_adapter.* keys
    IP-Adapter/models/image_encoder/                                        CLIPVisionModelWithProjection

The adapters' `ip_adapter` keys are `{i}.to_k_ip.weight` / `{i}.to_v_ip.weight` with `i` the odd
indices of the UNet's attention processors (the 16 cross-attention layers of SD1.5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from export import loaders
from export.specs import TINY_SD15, ModelSpec
from export.tiny import MARKER, _fingerprint, _flat
from export.tokenizer import write_clip_tokenizer


def write_tiny_sd15(folder: Path, seed: int = 0, spec: ModelSpec = TINY_SD15) -> Path:
    """Write every tiny SD1.5 component under `folder` (see module docstring); returns `folder`.

    Deterministic for a seed; skips the work when `folder` already holds the same seed and spec.
    `spec` may be any variant of TINY_SD15 (`dataclasses.replace` with other widths): the files are
    sized by it, and `--weights folder` builds read those sizes back (export.checkpoint_dims).
    """
    folder = Path(folder)
    marker = folder / MARKER
    stamp = {"model": spec.name, "seed": seed, "spec": _fingerprint(spec)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    base = folder / spec.sdxl_source.repo_name
    kwargs = dict(random_init=True)
    unet = loaders.load_unet(spec, seed=seed + 1, **kwargs)
    unet.save_pretrained(base / "unet")
    loaders.load_vae(spec, seed=seed + 3, **kwargs).save_pretrained(base / "vae")
    loaders.load_text_stack(spec, seed=seed + 4, **kwargs).text_encoder.save_pretrained(base / "text_encoder")
    write_clip_tokenizer(base / "tokenizer")
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler, indent=2))

    ip_root = folder / spec.ip_adapter_source.repo_name
    for plus, source in ((False, spec.ip_adapter_source), (True, spec.ip_adapter_plus_source)):
        projector, state = loaders.load_ip_adapter(spec, unet, plus, seed=seed + 9 + 2 * plus, **kwargs)
        path = ip_root / source.path
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**_flat("image_proj", projector.state_dict()), **_flat("ip_adapter", state)}, path)
    loaders.load_image_encoder(spec, seed=seed + 6, **kwargs).save_pretrained(ip_root / spec.image_encoder_source.path)
    marker.write_text(json.dumps(stamp))
    return folder


def main(argv: list[str] | None = None) -> None:
    """CLI: write the tiny SD1.5 model to DIR."""
    parser = argparse.ArgumentParser(prog="python -m export.tiny_sd15", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_sd15(args.folder, args.seed))


if __name__ == "__main__":
    main()
