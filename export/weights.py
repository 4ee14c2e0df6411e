"""Find checkpoint files: a local folder laid out like the hub repositories, a local path, or the hub cache.

With `weights_dir`, `Source("InstantX/InstantID", "ip-adapter.bin")` is looked up at
`weights_dir/InstantID/ip-adapter.bin`. A source whose `repo_id` is an absolute path (what
`--base`, `--instantid` and `--ip-adapter` make of a local folder or file) is read from there, with or
without `weights_dir`. Otherwise the file comes from the Hugging Face hub (its local cache first);
offline, the error names what is missing and the flags to pass.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from export.specs import Source


class WeightsNotFound(FileNotFoundError):
    """A checkpoint file or folder is neither in the given folder nor obtainable from the hub."""


class UnsafePickle(ValueError):
    """A torch pickle that `torch.load(weights_only=True)` refuses: it holds code or objects, not only tensors."""


def load_pickle(path: Path, **kwargs):
    """`torch.load(path, map_location='cpu', weights_only=True)`; a file that holds more than tensors
    raises UnsafePickle saying which file and how to convert it (never unpickled unsafely here)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|global '([\w.]+)'", str(error))
        what = next((g for g in found.groups() if g), None) if found else None
        raise UnsafePickle(
            f"{path} contains Python code or objects{f' ({what})' if what else ''} that torch refuses to "
            "unpickle safely (weights_only=True): convert it to .safetensors on a machine where you trust the "
            f"file (python -m export.weights to-safetensors {path}) and pass the .safetensors file "
            "instead") from None


def local_root(source: Source) -> Path | None:
    """The folder of a source given as a local path (an absolute `repo_id`), else None (a hub id)."""
    root = Path(source.repo_id)
    return root if root.is_absolute() else None


def _hint(source: Source) -> str:
    return (f"download {source.repo_id}/{source.path or ''} and pass --weights DIR with it at "
            f"DIR/{source.repo_name}/{source.path} (or its folder or file as --base / --instantid / --ip-adapter), "
            "or use --random-init for random weights")


def resolve(source: Source, weights_dir: Path | None = None, *, folder: bool = False,
            patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt")) -> Path:
    """Local path of `source` (a file, or a folder when `folder=True`).

    weights_dir: folder holding `<repo name>/<path>`; None means the hub (cache first). A source
    with an absolute `repo_id` is that local folder (`weights_dir` does not apply).
    patterns: for folders fetched from the hub, which files to fetch.
    Raises WeightsNotFound with the path looked at and what to do.
    """
    root = local_root(source)
    if root is not None:
        path = root / source.path
        if (path.is_dir() if folder else path.is_file()):
            return path
        raise WeightsNotFound(f"{path} not found: the folder {root} given on the command line has no "
                              f"{source.path or 'such entry'} (laid out as the hub repository it stands for)")
    if weights_dir is not None:
        path = Path(weights_dir) / source.repo_name / source.path
        if (path.is_dir() if folder else path.is_file()):
            return path
        raise WeightsNotFound(f"{path} not found: {_hint(source)}")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if folder:
            allow = [f"{source.path}/{p}" if source.path else p for p in patterns]
            root = snapshot_download(source.repo_id, allow_patterns=allow)
            path = Path(root) / source.path
        else:
            path = Path(hf_hub_download(source.repo_id, source.path))
    except Exception as error:  # offline, gated, unknown repo: all mean "not obtainable here"
        raise WeightsNotFound(f"{source.repo_id}/{source.path} is not in the hub cache and could not be "
                              f"downloaded ({type(error).__name__}): {_hint(source)}") from error
    if not path.exists():
        raise WeightsNotFound(f"{source.repo_id} has no {source.path}: {_hint(source)}")
    return path


# -- `--base`, `--instantid`, `--ip-adapter`: where a spec's files come from ------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.json")


class SourceError(ValueError):
    """A `--base` / `--instantid` / `--ip-adapter` value that is no usable file, folder or hub id."""


def locate(value: str, flag: str) -> str | Path:
    """A flag's value -> a local Path (file or folder, made absolute) or a hub id (str).

    `owner/name/…/file.safetensors` that is not a local file is fetched from the hub (cache first).
    """
    path = Path(value).expanduser()
    if path.exists():
        return path.resolve()
    if _HUB_ID.fullmatch(value):
        return value
    parts = value.split("/")
    if len(parts) > 2 and _HUB_ID.fullmatch("/".join(parts[:2])):  # a file inside a hub repository
        return resolve(Source("/".join(parts[:2]), "/".join(parts[2:])))
    raise SourceError(f"{flag} {value}: no such file or folder, and not a hub id (owner/name)")


def _require(root: Path, paths: tuple[str, ...], flag: str, what: str) -> None:
    absent = [p for p in paths if not (root / p).exists()]
    if absent:
        raise SourceError(f"{flag} {root}: {what}, but it has no {absent}")


def base_source(value: str, model: str) -> Source:
    """`--base`: a hub id, a diffusers folder (unet/, vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/)
    or one `.safetensors` in the original layout (read through export.single_file with the shipped configs)."""
    from export.single_file import base_folder, is_single_file

    where = locate(value, "--base")
    if isinstance(where, str):
        return Source(where)
    if is_single_file(where):
        return Source(str(base_folder(where, model)))
    _require(where, ("unet", "vae", "text_encoder", "scheduler"), "--base",
             "a base folder is laid out as a diffusers pipeline (or pass the single .safetensors file)")
    return Source(str(where))


def instantid_sources(value: str) -> dict[str, Source]:
    """`--instantid`: a folder or hub id laid out as InstantX/InstantID (ControlNetModel/, ip-adapter.bin)."""
    where = locate(value, "--instantid")
    if isinstance(where, Path):
        _require(where, ("ControlNetModel/config.json", "ip-adapter.bin"), "--instantid",
                 "an InstantID folder holds ControlNetModel/ and ip-adapter.bin")
    repo = str(where)
    return {"controlnet_source": Source(repo, "ControlNetModel"), "instantid_adapter_source": Source(repo, "ip-adapter.bin")}


def ip_adapter_sources(value: str, spec) -> dict[str, Source]:
    """`--ip-adapter`: a folder or hub id laid out as h94/IP-Adapter (adapters and image encoder at the
    spec's paths), or one adapter file (plain or Plus, told by its tensors; the image encoder stays the
    spec's)."""
    from export.checkpoint_dims import tensor_shapes

    where = locate(value, "--ip-adapter")
    if isinstance(where, Path) and where.is_file():
        shapes = tensor_shapes(where)
        if not any(key.startswith("ip_adapter.") for key in shapes):
            raise SourceError(f"--ip-adapter {where} holds no ip_adapter.* tensors ({len(shapes)} tensors, e.g. "
                              f"{sorted(shapes)[:3]}): pass an IP-Adapter checkpoint (image_proj.* + ip_adapter.*)")
        field = "ip_adapter_plus_source" if "image_proj.latents" in shapes else "ip_adapter_source"
        return {field: Source(str(where.parent), where.name)}
    repo = str(where)
    return {field: Source(repo, getattr(spec, field).path)
            for field in ("ip_adapter_source", "ip_adapter_plus_source", "image_encoder_source")}


def with_sources(spec, base: str | None = None, instantid: str | None = None, ip_adapter: str | None = None):
    """`spec` with the Source entries the flags replace (dataclasses.replace; sizes are read later)."""
    import dataclasses

    changes = {}
    if base is not None:
        changes["sdxl_source"] = base_source(base, spec.name)
    if instantid is not None:
        changes.update(instantid_sources(instantid))
    if ip_adapter is not None:
        changes.update(ip_adapter_sources(ip_adapter, spec))
    return dataclasses.replace(spec, **changes) if changes else spec


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def source_record(value: str, flag: str) -> dict:
    """What a flag's value was, for the manifest's export flags: a file's name and sha256, a folder's
    weight and config files with theirs, or the hub id."""
    where = locate(value, flag)
    if isinstance(where, str):
        return {"repo": where}
    if where.is_file():
        return {"file": where.name, "sha256": sha256_of(where)}
    files = sorted({p for pattern in _WEIGHT_FILES for p in where.rglob(pattern) if p.is_file()})
    return {"folder": where.name, "files": [{"file": p.relative_to(where).as_posix(), "sha256": sha256_of(p)}
                                            for p in files]}


def to_safetensors(path: Path, out: Path | None = None) -> Path:
    """Convert a trusted torch pickle to `.safetensors` (nested dicts flattened to `group.key`, as the
    adapter and LoRA readers expect). Unpickles with weights_only=False: only for a file you trust."""
    import torch
    from safetensors.torch import save_file

    def flat(prefix: str, value) -> dict:
        if isinstance(value, torch.Tensor):
            return {prefix: value.contiguous()}
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(f"{prefix}.{key}" if prefix else str(key),
                                                                         item).items()}
        return {}  # code, numbers, strings: not weights

    tensors = flat("", torch.load(path, map_location="cpu", weights_only=False))
    out = Path(out) if out else Path(path).with_suffix(".safetensors")
    save_file(tensors, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m export.weights to-safetensors FILE [OUT]`."""
    from export.cli import ArgumentParser, run

    def _main(argv):
        parser = ArgumentParser(prog="python -m export.weights", description="checkpoint file tools",
                                epilog="example: python -m export.weights to-safetensors ip-adapter.bin")
        commands = parser.add_subparsers(dest="command", required=True)
        convert = commands.add_parser("to-safetensors", help="convert a trusted torch pickle (.bin/.pt) to "
                                      ".safetensors; it is unpickled with weights_only=False",
                                      formatter_class=parser.formatter_class)
        convert.add_argument("file", type=Path, help="the pickle, from a source you trust")
        convert.add_argument("out", type=Path, nargs="?", help="default: FILE with the .safetensors suffix")
        args = parser.parse_args(argv)
        if not args.file.is_file():
            parser.error(f"{args.file} is not a file")
        print(to_safetensors(args.file, args.out))
        return 0

    return run(_main, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
