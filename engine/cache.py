"""Build cache and load-time checks over manifest engine records.

`needs_rebuild` decides at build time whether a component's plan is still good (same ONNX,
backend, flags, profiles, plan file present); `check_engine` refuses at load time a plan that
does not match the backend, the GPU or its recorded checksum, or that holds no weights
(`--strip-plan`), and says how to rebuild it: `rebuild_command` prints a `python -m engine`
command line that rebuilds that one component with the flags and profile it was built with.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from engine.backend import Backend, GpuInfo
from engine.manifest import BuildFlags, EngineRecord, sha256_files
from engine.profiles import DECODE_COMPONENTS, Profile, solve_symbols


class EngineCheckError(RuntimeError):
    """A plan cannot be used here; the message names the cause and the rebuild command."""


def rebuild_command(build_dir: str | Path, component: str, backend: str, *, record: EngineRecord | None = None,
                    force: bool = False, compute_capabilities: Sequence[str] | None = None) -> str:
    """The shell command (run from where build_dir is reachable) that rebuilds one component's engine.

    build_dir: the build directory (holds manifest.json); backend: "tensorrt" | "tensorrt-rtx".
    record: the engine record to reproduce: its opt level, workspace, refittable flag, target
    GPUs (same backend only) and its profile's batch/height/width ranges; never --strip-plan (the
    runtime cannot load a plan without weights). compute_capabilities: targets replacing the
    recorded ones. force: rebuild even if the manifest calls the plan current.
    Returns e.g. "python -m engine build/tiny --components unet --backend tensorrt-rtx --force".
    """
    words = ["python", "-m", "engine", str(build_dir), "--components", component, "--backend", backend]
    if record is not None:
        words += _recorded_options(record, component)
    targets = compute_capabilities or (record.flags.compute_capabilities if record is not None and
                                       record.backend == backend else None)
    if targets:
        words += ["--compute-capabilities", *targets]
    if force:
        words.append("--force")
    return shlex.join(words)


def _recorded_options(record: EngineRecord, component: str) -> list[str]:
    flags, words = record.flags, []
    if flags.opt_level != BuildFlags().opt_level:
        words += ["--opt-level", str(flags.opt_level)]
    if flags.workspace_gb is not None:
        words += ["--workspace-gb", f"{flags.workspace_gb:g}"]
    if flags.refittable:
        words.append("--refittable")
    if record.profiles:
        bases = solve_symbols({t.name: t.shape for t in record.inputs}, record.profiles[0])
        batch_option = "--decode-batch" if component in DECODE_COMPONENTS else "--batch"
        for base, option in (("batch", batch_option), ("height", "--height"), ("width", "--width")):
            if base in bases:
                words += [option, f"{bases[base].min}:{bases[base].opt}:{bases[base].max}"]
    return words


def needs_rebuild(record: EngineRecord | None, onnx_sha256: str, flags: BuildFlags, backend: Backend,
                  *, profiles: list[Profile] | tuple[Profile, ...] | None = None,
                  plan_path: str | Path | None = None) -> str | None:
    """Why this component's engine must be (re)built, or None if the recorded plan is current.

    record: the manifest's engine record (None: never built). onnx_sha256: checksum of the ONNX
    now on disk. flags/profiles: what the new build would use (profiles None: not compared).
    plan_path: if given, the plan must exist with the recorded size.
    """
    if record is None:
        return "first build"
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


def build_dir_of(record: EngineRecord, plan_path: str | Path) -> Path:
    """The build directory of a plan: plan_path without the record's relative path ("engines/c.plan")."""
    return Path(plan_path).parents[len(Path(record.path).parts) - 1]


def check_engine(record: EngineRecord, plan_path: str | Path, backend: Backend, gpu: GpuInfo | None,
                 *, verify_sha256: bool = True) -> None:
    """Refuse a plan that cannot run here, with a message that says how to rebuild it.

    record: the manifest's engine record; plan_path: the plan file (<build_dir>/<record.path>);
    backend: the loaded backend; gpu: the GPU engines will run on (None: skip the architecture
    check). verify_sha256: hash the whole plan (False: size check only, for a fast start).
    Raises EngineCheckError ending in a `python -m engine ...` command; None when usable.
    """
    plan = Path(plan_path)
    component = plan.stem
    where = f"{plan} ({record.backend} {record.backend_version})"

    def fail(cause: str, *, on: str = backend.name, force: bool = False, targets: Sequence[str] | None = None):
        command = rebuild_command(build_dir_of(record, plan), component, on, record=record, force=force,
                                  compute_capabilities=targets)
        raise EngineCheckError(f"{where}: {cause}. Rebuild it: {command}")

    if record.backend != backend.name:
        fail(f"built with {record.backend}, but this process uses {backend.name} {backend.version}")
    if record.backend_version != backend.version:
        fail(f"built with {record.backend} {record.backend_version}, but {backend.version} is "
             "installed; plans only load in the exact version that built them")
    if not plan.is_file():
        fail("the plan file is missing", force=True)
    if record.flags.strip_plan:
        refill = shlex.join(["python", "-c", "import sys; from engine.refit import refill_stripped; "
                             "refill_stripped(*sys.argv[1:])", str(build_dir_of(record, plan)), component])
        fail(f"it was built with --strip-plan and holds no weights, and the runtime does not refit plans. "
             f"Put the weights back from its ONNX on this GPU: {refill}; or", force=True)
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
        fail(cause, force=True, targets=[gpu.sm])
