"""Write a tiny model (`tiny`: SDXL family; `tiny-sd15`: SD1.5 family): every component, seeded, in
the on-disk formats of the real checkpoints.

    python -m export.tiny DIR [--model tiny|tiny-sd15] [--seed N]

DIR then holds what `--weights DIR` expects for the real model (`--model sdxl` / `sd15`):

    stable-diffusion-xl-base-1.0/{unet,vae,text_encoder,text_encoder_2,tokenizer,tokenizer_2,scheduler}/
    InstantID/ControlNetModel/ + InstantID/ip-adapter.bin          (torch pickle: image_proj, ip_adapter)
    IP-Adapter/sdxl_models/ip-adapter{,-plus}_sdxl_vit-h.safetensors + IP-Adapter/models/image_encoder/
    antelopev2/{scrfd_10g_bnkps.onnx, glintr100.onnx}              (random weights, real I/O signatures)

For SD1.5: stable-diffusion-v1-5/{unet,vae,text_encoder,tokenizer,scheduler}/ and
IP-Adapter/models/ip-adapter{,-plus}_sd15.safetensors + IP-Adapter/models/image_encoder/ (no
InstantID, no face models: the family has no InstantID pipeline). The adapters' `ip_adapter` keys
are `{i}.to_k_ip.weight` / `{i}.to_v_ip.weight`, `i` the odd indices of the UNet's attention processors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from export import loaders
from export.specs import TINY, ModelSpec, get_spec
from export.tokenizer import write_clip_tokenizer

MARKER = "tiny_model.json"


def _flat(prefix: str, state: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value.contiguous() for key, value in state.items()}


def write_tiny(folder: Path, seed: int = 0, spec: ModelSpec = TINY) -> Path:
    """Write every tiny component under `folder` (see module docstring); returns `folder`.

    Deterministic for a seed: the same seed writes the same weights. Skips the work when `folder`
    already holds a complete model written with the same seed and spec. `spec` may be any variant
    of TINY or TINY_SD15 (e.g. `dataclasses.replace` with other widths and depths): the files are sized by it,
    and `--weights folder` builds read those sizes back (export.checkpoint_dims).
    """
    folder = Path(folder)
    marker = folder / MARKER
    stamp = {"model": spec.name, "seed": seed, "spec": _fingerprint(spec)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    unet = _write_base(folder / spec.sdxl_source.repo_name, spec, seed)
    if "instantid" in spec.pipelines:
        instantid = folder / spec.controlnet_source.repo_name
        loaders.load_controlnet(spec, seed=seed + 2, random_init=True).save_pretrained(
            instantid / spec.controlnet_source.path)
        resampler, ip_state = loaders.load_instantid_adapter(spec, unet, seed=seed + 8, random_init=True)
        torch.save({"image_proj": resampler.state_dict(), "ip_adapter": ip_state},
                   instantid / spec.instantid_adapter_source.path)

    ip_root = folder / spec.ip_adapter_source.repo_name
    for plus, source in ((False, spec.ip_adapter_source), (True, spec.ip_adapter_plus_source)):
        projector, state = loaders.load_ip_adapter(spec, unet, plus, seed=seed + 9 + 2 * plus, random_init=True)
        path = ip_root / source.path
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**_flat("image_proj", projector.state_dict()), **_flat("ip_adapter", state)}, path)
    loaders.load_image_encoder(spec, seed=seed + 6, random_init=True).save_pretrained(
        ip_root / spec.image_encoder_source.path)

    if "instantid" in spec.pipelines:
        from export.tiny_face import write_tiny_face_models

        write_tiny_face_models(folder / spec.face_models_dir, seed=seed)
    marker.write_text(json.dumps(stamp))
    return folder


def _write_base(base: Path, spec: ModelSpec, seed: int):
    """The base model's diffusers folder (UNet, VAE, the family's text encoders and tokenizers,
    scheduler) under `base`; returns the UNet (the adapters are sized by it)."""
    unet = loaders.load_unet(spec, seed=seed + 1, random_init=True)
    unet.save_pretrained(base / "unet")
    loaders.load_vae(spec, seed=seed + 3, random_init=True).save_pretrained(base / "vae")
    text = loaders.load_text_stack(spec, seed=seed + 4, random_init=True)
    text.text_encoder.save_pretrained(base / "text_encoder")
    write_clip_tokenizer(base / "tokenizer")
    if "text_encoder_2" in spec.text_encoders:
        text.text_encoder_2.save_pretrained(base / "text_encoder_2")
        write_clip_tokenizer(base / "tokenizer_2", pad_token="!")
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler, indent=2))
    return unet


def _fingerprint(spec: ModelSpec) -> str:
    """Short hash of the architecture a folder was written with (its configs and projector geometry)."""
    import dataclasses
    import hashlib

    return hashlib.sha256(repr(dataclasses.asdict(spec)).encode()).hexdigest()[:16]


EXAMPLES = """examples:
  python -m export.tiny weights/tiny                       # then: python -m export.build --model sdxl --weights weights/tiny
  python -m export.tiny weights/tiny-sd15 --model tiny-sd15 --seed 3
  python -m export.tiny weights/tiny --controlnet            # + weights/tiny/controlnet-canny-tiny (a ControlNet
                                                             #   for --controlnet canny=weights/tiny/controlnet-canny-tiny)

python -m export.build --model tiny writes the same folder to <out>/weights by itself."""


def main(argv: list[str] | None = None) -> int:
    """CLI: write the tiny model to DIR (a mistake: one `error:` line, exit 2; export.cli)."""
    from export.cli import ArgumentParser, run

    def _main(argv: list[str]) -> int:
        parser = ArgumentParser(prog="python -m export.tiny", description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
        parser.add_argument("folder", type=Path, help="where to write the model (created; kept when it already holds "
                                                      "the same model and seed)")
        parser.add_argument("--model", choices=("tiny", "tiny-sd15"), default="tiny",
                            help="tiny: the SDXL family (InstantID, IP-Adapters, face models); tiny-sd15: SD1.5")
        parser.add_argument("--seed", type=int, default=0, help="seed of every weight")
        parser.add_argument("--controlnet", action="store_true",
                            help="also write an extra SDXL ControlNet of the tiny UNet's geometry in diffusers' folder "
                                 "format to FOLDER/controlnet-canny-tiny (export.controlnets; for export.build "
                                 "--controlnet canny=FOLDER/controlnet-canny-tiny)")
        parser.add_argument("-v", "--verbose", action="store_true", help="the traceback of an error")
        args = parser.parse_args(argv)
        if args.controlnet and args.model != "tiny":
            parser.error("--controlnet: extra ControlNets are SDXL-family models: use --model tiny")
        if args.folder.exists() and not args.folder.is_dir():
            parser.error(f"{args.folder} is a file: pass a folder to write the model into")
        print(write_tiny(args.folder, args.seed, get_spec(args.model)))
        if args.controlnet:
            from export.controlnets import write_tiny_controlnet

            print(write_tiny_controlnet(args.folder / "controlnet-canny-tiny", get_spec(args.model), seed=args.seed + 20))
        return 0

    return run(_main, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
