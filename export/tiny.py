"""Write the `tiny` model: every component, seeded, in the on-disk formats of the real checkpoints.

    python -m export.tiny DIR [--seed N]

DIR then holds what `--weights DIR` expects for the real model:

    stable-diffusion-xl-base-1.0/{unet,vae,text_encoder,text_encoder_2,tokenizer,tokenizer_2,scheduler}/
    InstantID/ControlNetModel/ + InstantID/ip-adapter.bin          (torch pickle: image_proj, ip_adapter)
    IP-Adapter/sdxl_models/ip-adapter{,-plus}_sdxl_vit-h.safetensors + IP-Adapter/models/image_encoder/
    antelopev2/{scrfd_10g_bnkps.onnx, glintr100.onnx}              (random weights, real I/O signatures)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from export import loaders
from export.specs import TINY, ModelSpec
from export.tokenizer import write_clip_tokenizer

MARKER = "tiny_model.json"


def _flat(prefix: str, state: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value.contiguous() for key, value in state.items()}


def write_tiny(folder: Path, seed: int = 0, spec: ModelSpec = TINY) -> Path:
    """Write every tiny component under `folder` (see module docstring); returns `folder`.

    Deterministic for a seed: the same seed writes the same weights. Skips the work when `folder`
    already holds a complete model written with the same seed and spec. `spec` may be any variant
    of TINY (e.g. `dataclasses.replace` with other widths and depths): the files are sized by it,
    and `--weights folder` builds read those sizes back (export.checkpoint_dims).
    """
    folder = Path(folder)
    marker = folder / MARKER
    stamp = {"model": spec.name, "seed": seed, "spec": _fingerprint(spec)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    sdxl = folder / spec.sdxl_source.repo_name
    kwargs = dict(random_init=True)
    unet = loaders.load_unet(spec, seed=seed + 1, **kwargs)
    unet.save_pretrained(sdxl / "unet")
    loaders.load_vae(spec, seed=seed + 3, **kwargs).save_pretrained(sdxl / "vae")
    text = loaders.load_text_stack(spec, seed=seed + 4, **kwargs)
    text.text_encoder.save_pretrained(sdxl / "text_encoder")
    text.text_encoder_2.save_pretrained(sdxl / "text_encoder_2")
    write_clip_tokenizer(sdxl / "tokenizer")
    write_clip_tokenizer(sdxl / "tokenizer_2", pad_token="!")
    (sdxl / "scheduler").mkdir(parents=True, exist_ok=True)
    (sdxl / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler, indent=2))

    instantid = folder / spec.controlnet_source.repo_name
    loaders.load_controlnet(spec, seed=seed + 2, **kwargs).save_pretrained(instantid / spec.controlnet_source.path)
    resampler, ip_state = loaders.load_instantid_adapter(spec, unet, seed=seed + 8, **kwargs)
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": ip_state},
               instantid / spec.instantid_adapter_source.path)

    ip_root = folder / spec.ip_adapter_source.repo_name
    for plus, source in ((False, spec.ip_adapter_source), (True, spec.ip_adapter_plus_source)):
        projector, state = loaders.load_ip_adapter(spec, unet, plus, seed=seed + 9 + 2 * plus, **kwargs)
        path = ip_root / source.path
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**_flat("image_proj", projector.state_dict()), **_flat("ip_adapter", state)}, path)
    loaders.load_image_encoder(spec, seed=seed + 6, **kwargs).save_pretrained(ip_root / spec.image_encoder_source.path)

    from export.tiny_face import write_tiny_face_models

    write_tiny_face_models(folder / spec.face_models_dir, seed=seed)
    marker.write_text(json.dumps(stamp))
    return folder


def _fingerprint(spec: ModelSpec) -> str:
    """Short hash of the architecture a folder was written with (its configs and projector geometry)."""
    import dataclasses
    import hashlib

    return hashlib.sha256(repr(dataclasses.asdict(spec)).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    """CLI: write the tiny model to DIR."""
    parser = argparse.ArgumentParser(prog="python -m export.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny(args.folder, args.seed))


if __name__ == "__main__":
    main()
