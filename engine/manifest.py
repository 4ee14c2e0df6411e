"""`manifest.json`: the build directory's record of every component's ONNX and engine.

Layout (see DESIGN.md): build/<model>/{manifest.json, onnx/<c>.onnx, engines/<c>.plan, assets/}.

Schema (version 1), all paths relative to the build directory (`load_manifest` refuses any
that is absolute or leads outside it)::

    {"schema_version": 1, "model": "tiny", "metadata": {...owned by export/...},
     "components": {"<component>": {
        "onnx":   {"path", "sha256", "size_bytes", "params", "opset", "external_data": [..],
                   "inputs": [{"name", "dtype", "shape": [int | axis name]}], "outputs": [...],
                   "export_flags": {...}, "export_seconds"},
        "engine": {"path", "onnx_sha256", "backend", "backend_version", "compute_capabilities",
                   "build_device", "flags": {"opt_level", "workspace_gb", "refittable",
                   "strip_plan", "compute_capabilities", "user_allocation"},
                   "profiles": [{"<input>": {"min", "opt", "max"}}],
                   "inputs"/"outputs": [{"name", "dtype", "shape", "min", "opt", "max"}],
                   "build_seconds", "plan_bytes", "plan_sha256", "built_at",
                   "activation_bytes"} }}}

`onnx` is written by the exporter through `record_onnx`; `engine` by `engine.build_all`.
Tensors are engine.tensors.TensorSpec (dtype names from its one dtype map); axis names in shapes
follow engine/profiles.py. An engine output has no min/opt/max where an axis name does not
determine a size (older manifests wrote null); runtimes should still ask the execution context.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.profiles import Profile, ShapeRange
from engine.tensors import TensorSpec, json_fields, onnx_dtype, onnx_io, spec_from_dict

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    """manifest.json is missing, unreadable or lacks what was asked for."""


@dataclass
class OnnxRecord:
    """One exported ONNX file (plus external data) and how it was made."""

    path: str
    sha256: str
    size_bytes: int
    params: int
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...] = ()
    export_flags: dict[str, Any] = field(default_factory=dict)
    export_seconds: float = 0.0


@dataclass(frozen=True)
class BuildFlags:
    """Options that change the engine; a change triggers a rebuild.

    compute_capabilities: None = the backend's default targets (or the build GPU).
    user_allocation: built with REQUIRE_USER_ALLOCATION (plans the runtime captures in CUDA graphs).
    """

    opt_level: int = 3
    workspace_gb: float | None = None
    refittable: bool = False
    strip_plan: bool = False
    compute_capabilities: tuple[str, ...] | None = None
    user_allocation: bool = False


@dataclass
class EngineRecord:
    """One built plan: what it was built from, with what, for which GPUs, and its checksum.

    activation_bytes: the scratch (activation) memory an execution context needs at the profiles'
    largest shapes, as the builder reports it (None when the builder did not say).
    """

    path: str
    onnx_sha256: str
    backend: str
    backend_version: str
    compute_capabilities: tuple[str, ...]
    build_device: str
    flags: BuildFlags
    profiles: tuple[Profile, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build_seconds: float
    plan_bytes: int
    plan_sha256: str
    built_at: str
    activation_bytes: int | None = None


@dataclass
class Component:
    """One pipeline component: its ONNX record and (once built) its engine record."""

    onnx: OnnxRecord | None = None
    engine: EngineRecord | None = None


@dataclass
class Manifest:
    """The whole build directory: model name, components by name, exporter metadata."""

    model: str
    components: dict[str, Component] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


# ---- JSON <-> dataclasses --------------------------------------------------------------------

def _profile(d: dict) -> Profile:
    return {name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in d.items()}


def _onnx_record(d: dict) -> OnnxRecord:
    return OnnxRecord(d["path"], d["sha256"], d["size_bytes"], d["params"], d["opset"],
                      tuple(map(spec_from_dict, d["inputs"])), tuple(map(spec_from_dict, d["outputs"])),
                      tuple(d.get("external_data", ())), dict(d.get("export_flags", {})),
                      float(d.get("export_seconds", 0.0)))


def _flags(d: dict) -> BuildFlags:
    caps = d.get("compute_capabilities")
    return BuildFlags(d["opt_level"], d.get("workspace_gb"), d["refittable"], d["strip_plan"],
                      tuple(caps) if caps is not None else None, bool(d.get("user_allocation", False)))


def _engine_record(d: dict) -> EngineRecord:
    return EngineRecord(
        d["path"], d["onnx_sha256"], d["backend"], d["backend_version"],
        tuple(d["compute_capabilities"]), d["build_device"], _flags(d["flags"]),
        tuple(map(_profile, d["profiles"])), tuple(map(spec_from_dict, d["inputs"])),
        tuple(map(spec_from_dict, d["outputs"])), float(d["build_seconds"]), d["plan_bytes"],
        d["plan_sha256"], d["built_at"], d.get("activation_bytes"))


def manifest_from_dict(d: dict) -> Manifest:
    """Manifest from its JSON dict; ManifestError on a schema this code does not read."""
    if d.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"manifest schema {d.get('schema_version')} is not {SCHEMA_VERSION}; "
                            "rebuild the directory with this version of `python -m export.build`")
    components = {
        name: Component(_onnx_record(c["onnx"]) if c.get("onnx") else None,
                        _engine_record(c["engine"]) if c.get("engine") else None)
        for name, c in d.get("components", {}).items()}
    return Manifest(d["model"], components, dict(d.get("metadata", {})), d["schema_version"])


def manifest_to_dict(manifest: Manifest) -> dict:
    """JSON-ready dict of a Manifest (tuples become lists; see engine.tensors.json_fields)."""
    return json.loads(json.dumps(asdict(manifest, dict_factory=json_fields)))


# ---- files ---------------------------------------------------------------------------------

def load_manifest(build_dir: str | Path) -> Manifest:
    """Read build_dir/manifest.json; ManifestError saying how to create it if it is missing."""
    path = Path(build_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: export the model first "
                            f"(python -m export.build --model <model> --out {build_dir})")
    try:
        manifest = manifest_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ManifestError(f"{path} is unreadable ({error.__class__.__name__}: {error}); "
                            "delete it and re-run the export") from None
    check_paths(manifest, build_dir)
    return manifest


# ---- paths and checksums read from the manifest --------------------------------------------

def build_path(build_dir: str | Path, relative: str, what: str) -> Path:
    """build_dir / relative, for a path read from manifest.json.

    ManifestError when `relative` is not a relative path inside the build directory: absolute,
    empty, or leaving it through '..' or a symbolic link. A build directory is data, and its
    manifest must not make the runtime open (or hash, or unpickle) files elsewhere.
    """
    root = Path(build_dir)
    problem = None
    if not isinstance(relative, str):
        problem = "is not a string"
    elif not relative.strip():
        problem = "is empty"
    elif "\0" in relative or Path(relative).is_absolute():
        problem = "is absolute"
    else:
        inside = (root / relative).resolve()
        if not inside.is_relative_to(root.resolve()):
            problem = "leaves the build directory"
    if problem:
        raise ManifestError(f"{root / MANIFEST}: the {what} path {relative!r} {problem}; every path in a manifest "
                            "is relative to the build directory and stays inside it. The manifest was edited or "
                            "the directory was tampered with: rebuild it (python -m export.build ... --out "
                            f"{root})")
    return root / relative


def check_paths(manifest: Manifest, build_dir: str | Path) -> None:
    """ManifestError (see `build_path`) unless every path of `manifest` stays inside build_dir:
    each component's ONNX file, its external data, its engine plan, the torch programs, the assets."""
    for name, component in manifest.components.items():
        if component.onnx is not None:
            onnx_files(build_dir, component.onnx, name)
        if component.engine is not None:
            build_path(build_dir, component.engine.path, f"'{name}' engine")
    programs = manifest.metadata.get("torch_programs", {})
    if not isinstance(programs, dict):
        raise ManifestError(f"{Path(build_dir) / MANIFEST}: metadata.torch_programs is not an object; rebuild it")
    for name, record in programs.items():
        build_path(build_dir, record.get("path") if isinstance(record, dict) else None, f"'{name}' torch program")
    if "assets" in manifest.metadata:
        build_path(build_dir, manifest.metadata["assets"], "assets")


def onnx_files(build_dir: str | Path, record: OnnxRecord, component: str = "") -> list[Path]:
    """The ONNX file of `record` and its external data files (in the order `sha256` hashes them)."""
    onnx_path = build_path(build_dir, record.path, f"'{component}' ONNX")
    folder = os.path.dirname(record.path)  # external data lie beside the ONNX file
    return [onnx_path] + [build_path(build_dir, os.path.join(folder, data) if isinstance(data, str) else data,
                                     f"'{component}' ONNX external data") for data in record.external_data]


def verify_onnx(build_dir: str | Path, component: str, record: OnnxRecord, model: str = "<model>",
                verify_sha256: bool = True) -> list[Path]:
    """Check an ONNX file (and its external data) against the sha256 recorded by the exporter.

    verify_sha256=False skips hashing (for speed; the checksum must still be a real one).
    Returns the files (ONNX first). Raises ManifestError when the checksum is missing, zeroed or
    not a sha256, when a file is missing, or when the bytes do not match: say to re-export.
    """
    files = onnx_files(build_dir, record, component)
    export = f"python -m export.build --model {model} --stage onnx --out {build_dir}"
    checksum = record.sha256 if isinstance(record.sha256, str) else ""
    if len(checksum) != 64 or set(checksum) - set("0123456789abcdef") or not checksum.strip("0"):
        raise ManifestError(f"{Path(build_dir) / MANIFEST}: '{component}' has no valid ONNX sha256 "
                            f"({record.sha256!r}), so its ONNX cannot be checked: re-export it ({export})")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ManifestError(f"{missing[0]} not found ('{component}'): export it first ({export})")
    if verify_sha256 and sha256_files(files) != checksum:
        raise ManifestError(f"{files[0]}{' (with its external data)' if len(files) > 1 else ''} does not match "
                            f"its manifest sha256 (corrupt, truncated or replaced): re-export it ({export})")
    return files


def save_manifest(build_dir: str | Path, manifest: Manifest) -> Path:
    """Write build_dir/manifest.json atomically (temp file + rename). Returns the path."""
    path = Path(build_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest_to_dict(manifest), indent=2) + "\n"
    atomic_write(path, text.encode())
    return path


def atomic_write(path: Path, data) -> None:
    """Write bytes (or a buffer) to `path` so readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(build_dir: Path):
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / f".{MANIFEST}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_manifest(build_dir: str | Path, model: str, change: Callable[[Manifest], None]) -> Manifest:
    """Load (or start) the manifest, apply `change` in place, save; serialised by a file lock.

    model: used when the manifest does not exist yet; must match the existing one otherwise.
    """
    build_dir = Path(build_dir)
    with _locked(build_dir):
        manifest = (load_manifest(build_dir) if (build_dir / MANIFEST).is_file() else Manifest(model))
        if manifest.model != model:
            raise ManifestError(f"{build_dir} holds model '{manifest.model}', not '{model}'; "
                                "use another --out directory")
        change(manifest)
        save_manifest(build_dir, manifest)
    return manifest


def sha256_files(paths) -> str:
    """sha256 over the bytes of `paths` in order (an ONNX file, then its external data)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# ---- ONNX description ----------------------------------------------------------------------

def describe_onnx(onnx_path: str | Path, build_dir: str | Path | None = None, *,
                  export_flags: dict | None = None, export_seconds: float = 0.0) -> OnnxRecord:
    """Read an ONNX file's I/O, parameter count and checksum (external data included).

    onnx_path: the .onnx file; external data files are found next to it.
    build_dir: paths in the record are relative to it (default: the file's grandparent).
    """
    import onnx
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist: export the component first")
    root = Path(build_dir) if build_dir is not None else onnx_path.parent.parent
    model = onnx.load(str(onnx_path), load_external_data=False)
    io = onnx_io(model)
    params = sum(math.prod(t.dims) for t in model.graph.initializer
                 if onnx_dtype(t.data_type).startswith(("float", "bfloat")))
    files = [onnx_path] + [onnx_path.parent / name for name in io.external_data]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"external data {missing} of {onnx_path} is missing: re-export it")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxRecord(
        path=os.path.relpath(onnx_path, root), sha256=sha256_files(files),
        size_bytes=sum(f.stat().st_size for f in files), params=params, opset=opset,
        inputs=io.inputs, outputs=io.outputs, external_data=io.external_data, export_flags=dict(export_flags or {}),
        export_seconds=float(export_seconds))


def record_onnx(build_dir: str | Path, model: str, component: str, onnx_path: str | Path | None = None,
                *, export_flags: dict | None = None, export_seconds: float = 0.0) -> OnnxRecord:
    """Describe an exported ONNX and store it in manifest.json (the exporter calls this).

    onnx_path: default build_dir/onnx/<component>.onnx. The engine record, if any, is kept:
    `needs_rebuild` compares its onnx_sha256 with the new checksum. Returns the OnnxRecord.
    """
    build_dir = Path(build_dir)
    onnx_path = Path(onnx_path) if onnx_path else build_dir / "onnx" / f"{component}.onnx"
    record = describe_onnx(onnx_path, build_dir, export_flags=export_flags, export_seconds=export_seconds)

    def change(manifest: Manifest) -> None:
        manifest.components.setdefault(component, Component()).onnx = record

    update_manifest(build_dir, model, change)
    return record
