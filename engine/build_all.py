"""Build every component's engine of a build directory, skipping the ones that are current.

Reads manifest.json, builds onnx/<component>.onnx into engines/<component>.plan with profiles
from one Geometry, records each EngineRecord in the manifest as soon as it is built, and prints
a summary table. `python -m export.build --stage engines` and `python -m engine` call this.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from engine.backend import Backend, load_backend
from engine.build import build_engine
from engine.cache import needs_rebuild
from engine.manifest import (BuildFlags, Manifest, ManifestError, describe_onnx, load_manifest,
                             sha256_files, update_manifest)
from engine.profiles import Geometry, profile_for

log = logging.getLogger("engine")

CAPTURED = ("unet", "controlnet")  # the runtime captures these (the denoising loop) in CUDA graphs


def captured_in_graph(component: str) -> bool:
    """True for the loop's engines (unet*, controlnet), which the runtime runs inside CUDA graphs."""
    return component.startswith(CAPTURED)


@dataclass(frozen=True)
class BuildResult:
    """One row of the summary: what happened to a component and what it weighs."""

    component: str
    status: str          # "built" | "skipped" (shown as "unchanged, kept")
    reason: str          # why it was built, or "up to date"
    params: int
    onnx_bytes: int
    plan_bytes: int
    seconds: float       # build seconds (the recorded ones when skipped)
    scratch_bytes: int | None = None  # activation memory a context needs (builder's report)


def build_all(build_dir: str | Path, components: Sequence[str] | None = None,
              backend: Backend | str | None = None, *, geometry: Geometry | None = None,
              opt_level: int = 3, workspace_gb: float | None = None, refittable: bool = False,
              strip_plan: bool = False, compute_capabilities: Sequence[str] | None = None,
              timing_cache: str | Path | None = None, force: bool = False,
              progress: bool = True) -> list[BuildResult]:
    """Build (or skip, when current) the engines of `build_dir`'s components.

    components: names to build (default: every component with an ONNX record).
    backend: Backend, "tensorrt" | "tensorrt-rtx", or None (detect).
    geometry: request shapes the profiles cover (default Geometry(): batch 1-4, 512-1536 px, the
        VAE decoder at decode_batch 1); Geometry.fixed(b, h, w) for a static serving size.
    timing_cache: tensorrt's timing cache file (default engines/timing.cache); unused on
        backends without one. force: rebuild even if current. progress: a line per component + the table.
    The loop's engines (captured_in_graph) get user_allocation (REQUIRE_USER_ALLOCATION) where the
    backend has it. Other flags as in build_engine. Returns one BuildResult per component, in order.
    """
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    names = _select(manifest, components)
    backend = backend if isinstance(backend, Backend) else load_backend(backend)
    geometry = geometry or Geometry()
    flags = BuildFlags(opt_level, workspace_gb, refittable, strip_plan,
                       tuple(s.lower() for s in compute_capabilities) if compute_capabilities else None)
    cache = None
    if backend.caps.timing_cache:
        cache = Path(timing_cache) if timing_cache else build_dir / "engines" / "timing.cache"

    results = []
    if progress:
        print(f"{backend.name} {backend.version} engines of {build_dir}: {len(names)} components", flush=True)
    for index, name in enumerate(names, 1):
        component_flags = replace(flags, user_allocation=captured_in_graph(name) and backend.caps.user_allocation)
        results.append(_build_one(build_dir, manifest, name, backend, geometry.for_component(name),
                                  component_flags, cache, force))
        if progress:
            print(progress_line(index, len(names), results[-1]), flush=True)
    if progress:
        print(summary_table(results))
    return results


def _select(manifest: Manifest, components: Sequence[str] | None) -> list[str]:
    known = [name for name, c in manifest.components.items() if c.onnx is not None]
    if components is None:
        return known
    unknown = [name for name in components if name not in known]
    if unknown:
        raise ManifestError(f"components {unknown} have no exported ONNX in the manifest; "
                            f"known: {known}. Export them first (python -m export.build --model "
                            f"{manifest.model} --stage onnx)")
    return list(components)


def _build_one(build_dir: Path, manifest: Manifest, name: str, backend: Backend, geometry: Geometry,
               flags: BuildFlags, cache: Path | None, force: bool) -> BuildResult:
    component = manifest.components[name]
    onnx = component.onnx
    onnx_path = build_dir / onnx.path
    files = [onnx_path] + [onnx_path.parent / f for f in onnx.external_data]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{onnx_path} (or its external data) is missing: re-export '{name}'")
    sha = sha256_files(files)
    if sha != onnx.sha256:  # re-exported without record_onnx: describe it afresh
        onnx = describe_onnx(onnx_path, build_dir, export_flags=onnx.export_flags,
                             export_seconds=onnx.export_seconds)
        _store(build_dir, manifest, name, onnx=onnx)
    plan_path = build_dir / "engines" / f"{name}.plan"
    profiles = [profile_for({t.name: t.shape for t in onnx.inputs}, geometry)]
    reason = "forced" if force else needs_rebuild(component.engine, sha, flags, backend,
                                                  profiles=profiles, plan_path=plan_path)
    if reason is None:
        engine = component.engine
        return BuildResult(name, "skipped", "up to date", onnx.params, onnx.size_bytes,
                           engine.plan_bytes, engine.build_seconds, engine.activation_bytes)
    log.debug("building %s: %s", name, reason)
    record = build_engine(onnx_path, plan_path, profiles, backend, workspace_gb=flags.workspace_gb,
                          opt_level=flags.opt_level, refittable=flags.refittable,
                          strip_plan=flags.strip_plan, compute_capabilities=flags.compute_capabilities,
                          user_allocation=flags.user_allocation, timing_cache=cache, onnx_sha256=sha)
    record = replace(record, path=str(plan_path.relative_to(build_dir)))
    _store(build_dir, manifest, name, engine=record)
    return BuildResult(name, "built", reason, onnx.params, onnx.size_bytes, record.plan_bytes,
                       record.build_seconds, record.activation_bytes)


def _store(build_dir: Path, manifest: Manifest, name: str, **records) -> None:
    """Set records on the component in memory and in manifest.json (under the file lock)."""
    def change(current: Manifest) -> None:
        for key, value in records.items():
            setattr(current.components[name], key, value)

    update_manifest(build_dir, manifest.model, change)
    change(manifest)


def format_count(count: int) -> str:
    """1096 -> '1.1K', 2_567_000_000 -> '2.57B'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def status_text(result: BuildResult) -> str:
    """'built (<why>)' or 'unchanged, kept'."""
    return "unchanged, kept" if result.status == "skipped" else f"built ({result.reason})"


def progress_line(index: int, total: int, result: BuildResult) -> str:
    """'[ 9/13] controlnet            built (first build) in 9.3 s' or '... unchanged, kept'."""
    head = f"[{index:>{len(str(total))}}/{total}] {result.component:<22}"
    return head + (status_text(result) if result.status == "skipped" else f"{status_text(result)} in {result.seconds:.1f} s")


def summary_table(results: Sequence[BuildResult]) -> str:
    """Plain-text table: component, params, onnx MB, engine MB, scratch MB (the activation memory a
    context needs at the largest shapes; the shared pool is the largest), seconds, status (+ reason)."""
    header = ("component", "params", "onnx MB", "engine MB", "scratch MB", "seconds", "status")
    rows = [(r.component, format_count(r.params), f"{r.onnx_bytes / 1e6:.1f}", f"{r.plan_bytes / 1e6:.1f}",
             "?" if r.scratch_bytes is None else f"{r.scratch_bytes / 1e6:.1f}",
             f"{r.seconds:.1f}", status_text(r))
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
