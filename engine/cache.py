"""Build cache and load-time checks over manifest engine records.

`needs_rebuild` decides at build time whether a component's plan is still good (same ONNX,
backend, flags, profiles, plan file present); `check_engine` refuses at load time a plan that
does not match the backend, the GPU or its recorded checksum, and says how to rebuild it.
"""
from __future__ import annotations

from pathlib import Path

from engine.backend import Backend, GpuInfo
from engine.manifest import BuildFlags, EngineRecord, sha256_files
from engine.profiles import Profile


class EngineCheckError(RuntimeError):
    """A plan cannot be used here; the message names the cause and the rebuild command."""


def rebuild_command(model: str, component: str, backend: str, *, force: bool = False) -> str:
    """The shell command that rebuilds one component's engine."""
    command = (f"python -m export.build --model {model} --stage engines "
               f"--components {component} --backend {backend}")
    return command + (" --force" if force else "")


def needs_rebuild(record: EngineRecord | None, onnx_sha256: str, flags: BuildFlags, backend: Backend,
                  *, profiles: list[Profile] | tuple[Profile, ...] | None = None,
                  plan_path: str | Path | None = None) -> str | None:
    """Why this component's engine must be (re)built, or None if the recorded plan is current.

    record: the manifest's engine record (None: never built). onnx_sha256: checksum of the ONNX
    now on disk. flags/profiles: what the new build would use (profiles None: not compared).
    plan_path: if given, the plan must exist with the recorded size.
    """
    if record is None:
        return "no engine built yet"
    if record.onnx_sha256 != onnx_sha256:
        return f"ONNX changed (sha256 {record.onnx_sha256[:12]} -> {onnx_sha256[:12]})"
    if (record.backend, record.backend_version) != (backend.name, backend.version):
        return (f"backend changed ({record.backend} {record.backend_version} -> "
                f"{backend.name} {backend.version})")
    if record.flags != flags:
        changed = [f"{key} {old!r} -> {new!r}" for key, old, new in _diff(record.flags, flags)]
        return "build flags changed: " + ", ".join(changed)
    if profiles is not None and tuple(profiles) != tuple(record.profiles):
        return "optimisation profiles changed: " + _profile_diff(record.profiles, tuple(profiles))
    if plan_path is not None:
        plan = Path(plan_path)
        if not plan.is_file():
            return f"plan {plan} is missing"
        if plan.stat().st_size != record.plan_bytes:
            return f"plan {plan} has {plan.stat().st_size} bytes, the manifest says {record.plan_bytes}"
    return None


def _diff(old: BuildFlags, new: BuildFlags):
    for key in old.__dataclass_fields__:
        if getattr(old, key) != getattr(new, key):
            yield key, getattr(old, key), getattr(new, key)


def _profile_diff(old: tuple[Profile, ...], new: tuple[Profile, ...]) -> str:
    if len(old) != len(new):
        return f"{len(old)} -> {len(new)} profiles"
    for index, (a, b) in enumerate(zip(old, new)):
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                return f"profile {index} input '{name}': {_fmt(a.get(name))} -> {_fmt(b.get(name))}"
    return "reordered"


def _fmt(shape_range) -> str:
    if shape_range is None:
        return "absent"
    return f"min {list(shape_range.min)} opt {list(shape_range.opt)} max {list(shape_range.max)}"


def check_engine(record: EngineRecord, plan_path: str | Path, backend: Backend, gpu: GpuInfo | None,
                 *, verify_sha256: bool = True, model: str | None = None) -> None:
    """Refuse a plan that cannot run here, with a message that says how to rebuild it.

    record: the manifest's engine record; plan_path: the plan file; backend: the loaded backend;
    gpu: the GPU engines will run on (None: skip the architecture check). verify_sha256: hash
    the whole plan (False: size check only, for a fast start). model: for the rebuild command
    (default: the build directory's name, build/<model>/engines/<c>.plan).
    Raises EngineCheckError; returns None when the plan is usable.
    """
    plan = Path(plan_path)
    component = plan.stem
    model = model or plan.resolve().parent.parent.name
    where = f"{plan} ({record.backend} {record.backend_version})"

    def fail(cause: str, *, on: str = backend.name, force: bool = False, extra: str = ""):
        command = rebuild_command(model, component, on, force=force) + extra
        raise EngineCheckError(f"{where}: {cause}. Rebuild it: {command}")

    if record.backend != backend.name:
        fail(f"built with {record.backend}, but this process uses {backend.name} {backend.version}")
    if record.backend_version != backend.version:
        fail(f"built with {record.backend} {record.backend_version}, but {backend.version} is "
             "installed; plans only load in the exact version that built them")
    if not plan.is_file():
        fail("the plan file is missing", force=True)
    size = plan.stat().st_size
    if size != record.plan_bytes:
        fail(f"the plan is truncated or corrupt: {size} bytes on disk, {record.plan_bytes} recorded",
             force=True)
    if verify_sha256 and sha256_files([plan]) != record.plan_sha256:
        fail("the plan is corrupt: its sha256 does not match the manifest", force=True)
    if gpu is not None and record.compute_capabilities and gpu.sm not in record.compute_capabilities:
        cause = f"it targets {', '.join(record.compute_capabilities)}, not this GPU ({gpu.name}, {gpu.sm})"
        if not backend.caps.compute_capabilities:
            fail(cause + "; rebuild on this GPU", force=True)
        if gpu.sm.upper() not in backend.trt.ComputeCapability.__members__:
            fail(f"{cause}, and {backend.name} {backend.version} cannot target {gpu.sm}; "
                 "use the tensorrt backend on this GPU", on="tensorrt", force=True)
        fail(cause, force=True, extra=f" --compute-capabilities {gpu.sm}")
