"""What output sizes a server can run: the build's engine profiles, and on ONNX Runtime's CPU the
memory its attention needs.

ONNX Runtime runs the exported attention as MatMul -> Softmax -> MatMul, so it holds the scores of
the largest self-attention — the UNet's (and ControlNet's) block at latent/2, N = (H/16)·(W/16)
tokens — as rows × heads × N² float32 values, several times over. Measured on the tiny build
(peak RSS growth of one run over the size of one score tensor, 512² to 1024², 1 step):
6.2–6.6×. So a run at W×H with `rows` UNet rows (2 per image with CFG) needs about

    ATTENTION_PEAK_FACTOR · rows · heads · N² · 4 bytes        (SDXL 1024², CFG: ≈ 8.7 GB)

and the server refuses (422) what the memory it found at start-up cannot hold, instead of dying
mid-run. TensorRT's fused attention never holds the scores: there the engine profile bounds the size.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from engine.manifest import load_manifest
from runtime.images import MAX_ASPECT_RATIO, MAX_SIDE

ATTENTION_HEADS = {"sdxl": 10, "tiny": 4,  # heads of the largest self-attention (block 1, latent/2)
                   # SD1.5 attends at the full latent (block 0): 8 (tiny: 2) heads over 4x the tokens,
                   # 16x the scores of as many heads at latent/2
                   "sd15": 8 * 16, "tiny-sd15": 2 * 16}
ATTENTION_PEAK_FACTOR = 6.5  # peak memory per byte of one score tensor (measured, see above)
RUNTIME_BYTES = 2 * 2**30  # libraries, arenas, thread stacks, activations beside the weights and scores
SIDE_MULTIPLE = 64


@dataclass(frozen=True)
class Limits:
    """Per-request limits (`python -m runtime serve` derives them with `capacity.limits_for`).

    max_body_bytes: the body (413). max_image_pixels (413), max_image_side, max_image_aspect (422):
        each input photo, from its header before decoding.
    max_side, min_side: output side (px, 422 size_out_of_profile); max_side_source: what set max_side.
    max_cost: width x height / 2^20 x steps x num_images, in megapixel-steps (422 over_budget).
    memory_bytes: what one request's run may use for ONNX Runtime's attention (422 over_memory;
        None: not checked, e.g. TensorRT), with attention_heads at latent/2 (`capacity`).
    """

    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 25_000_000
    max_image_side: int = MAX_SIDE
    max_image_aspect: float = MAX_ASPECT_RATIO
    max_side: int = 2048
    min_side: int = 64
    max_side_source: str = "--max-side"
    max_cost: float = 200.0
    memory_bytes: int | None = None
    attention_heads: int = 10


def attention_bytes(width: int, height: int, rows: int, heads: int) -> int:
    """Estimated peak memory (bytes) of one ONNX Runtime CPU run at width x height px with `rows`
    UNet rows (num_images, x2 with guidance > 1) and `heads` attention heads at latent/2."""
    tokens = (width // 16) * (height // 16)
    return int(ATTENTION_PEAK_FACTOR * rows * heads * tokens * tokens * 4)


def largest_square(memory_bytes: int, rows: int, heads: int) -> int:
    """The largest side (a multiple of 64, at least 64) whose square run fits `memory_bytes`."""
    tokens = math.sqrt(max(memory_bytes, 0) / (ATTENTION_PEAK_FACTOR * rows * heads * 4))
    return max(SIDE_MULTIPLE, int(16 * math.sqrt(tokens)) // SIDE_MULTIPLE * SIDE_MULTIPLE)


def free_memory() -> tuple[int, str]:
    """(bytes this process can still allocate, what sets it): the least of /proc/meminfo's
    MemAvailable, the cgroup's limit minus its usage, and RLIMIT_AS / RLIMIT_DATA minus this
    process's VmSize / VmData."""
    found: list[tuple[int, str]] = []
    meminfo = _read_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "the machine's available memory (MemAvailable)"))
    cgroup = _cgroup_free()
    if cgroup is not None:
        found.append((cgroup, "the cgroup memory limit"))
    status = _read_fields("/proc/self/status")
    for limit, field, name in ((resource.RLIMIT_AS, "VmSize", "RLIMIT_AS"), (resource.RLIMIT_DATA, "VmData",
                                                                             "RLIMIT_DATA")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and field in status:
            found.append((soft - status[field], f"the process limit {name}"))
    return min(found) if found else (2**62, "nothing (no limit found)")


def _read_fields(path: str) -> dict[str, int]:
    """'Name:   123 kB' lines -> {name: bytes}."""
    fields = {}
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return fields


def _cgroup_free() -> int | None:
    """The cgroup's memory limit minus its usage (v2, else v1), or None without a limit."""
    try:
        relative = next((line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines()
                         if line.startswith("0::")), "/")
    except OSError:
        relative = "/"
    candidates = [(Path("/sys/fs/cgroup") / relative.lstrip("/"), "memory.max", "memory.current"),
                  (Path("/sys/fs/cgroup"), "memory.max", "memory.current"),
                  (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_file, usage_file in candidates:
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return int(limit) - usage
        return None
    return None


def engine_max_side(build_dir: str | os.PathLike, components: list[str]) -> int | None:
    """The largest square side (px) every one of `components` has an engine for, or None when
    none of them has an engine profile (ONNX Runtime / torch builds)."""
    manifest = load_manifest(Path(build_dir))
    factor = int(manifest.metadata.get("vae_scale_factor", 8))
    sides = []
    for component in components:
        entry = manifest.components.get(component)
        tensor = None if entry is None or entry.engine is None else next(
            (t for t in entry.engine.inputs if t.name == "sample" and t.max is not None), None)
        if tensor is not None:
            sides.append(min(tensor.max[2], tensor.max[3]) * factor)
    return min(sides) if sides else None


def limits_for(build_dir: str | os.PathLike, backend: str, pipelines: list[str], max_side: int | None = None,
               memory_gb: float | None = None, max_batch: int = 1, **fixed):
    """The `Limits` of a server over `build_dir` (`python -m runtime serve` calls it at start-up).

    max_side: the flag; None derives it: the least of 2048, the served engines' profile (TensorRT only:
    ONNX Runtime and torch run any size a build's engines were not built for)
    and, on ONNX Runtime, the largest square a request of one image with CFG can run in memory.
    Memory (ONNX Runtime only): `memory_gb`, else `free_memory()` now, less the served components'
    ONNX weights and RUNTIME_BYTES; each request may use 1/max_batch of it, since up to max_batch
    requests of one size share a denoising loop. fixed: the other Limits fields (body, photo, cost).
    """
    from runtime.pipelines import PIPELINES  # torch: only when a server starts
    from runtime.serve.served import available_pipelines

    manifest = load_manifest(Path(build_dir))
    entries = [PIPELINES[name] for name in pipelines or available_pipelines(build_dir) if name in PIPELINES]
    stepped = stepped_components(entries)
    sides = [(2048, "the default of 2048")] if max_side is None else [(max_side, "--max-side")]
    engines = engine_max_side(build_dir, stepped) if _runs_engines(backend) else None  # ORT, torch: any size
    if max_side is None and engines is not None:
        sides.append((engines, "the build's engine profile"))
    memory_bytes, heads = None, ATTENTION_HEADS.get(manifest.model, ATTENTION_HEADS["sdxl"])
    if backend.strip().lower() in ("onnxruntime", "ort"):
        if memory_gb is not None:
            total, source = int(memory_gb * 2**30), "--memory-gb"
        else:
            free, source = free_memory()
            built = manifest.metadata.get("pipelines", {})
            used = {c for entry in entries for c in built.get(entry.name.replace("-", "_"), [])}
            weights = sum(manifest.components[c].onnx.size_bytes for c in used
                          if c in manifest.components and manifest.components[c].onnx is not None)
            total = free - weights - RUNTIME_BYTES
        memory_bytes = max(0, total // max(1, max_batch))
        if max_side is None:
            sides.append((largest_square(memory_bytes, 2, heads), f"this server's memory ({_gb(memory_bytes)} "
                          f"per request, from {source}, for ONNX Runtime's attention)"))
    side, reason = min(sides)
    return Limits(max_side=side, max_side_source=reason, memory_bytes=memory_bytes, attention_heads=heads, **fixed)


def stepped_components(entries) -> list[str]:
    """The components run at every denoising step by these registry entries: their UNets, and the
    ControlNet when one of them uses it."""
    return [entry.unet for entry in entries] + (["controlnet"] if any(
        entry.pipeline.uses_controlnet for entry in entries) else [])


def memory_shortfall(limits: Limits, width: int, height: int, num_images: int, guidance: float
                     ) -> tuple[int, int] | None:
    """(bytes ONNX Runtime's attention needs, the largest square side that fits) when a width x height run
    of `num_images` images (x2 rows with guidance > 1) needs more than `limits.memory_bytes`; else None
    (it fits, or memory is not checked)."""
    if limits.memory_bytes is None:
        return None
    rows = num_images * (2 if guidance > 1.0 else 1)
    need = attention_bytes(width, height, rows, limits.attention_heads)
    if need <= limits.memory_bytes:
        return None
    return need, largest_square(limits.memory_bytes, rows, limits.attention_heads)


def check_run(build_dir: str | os.PathLike, backend: str, pipeline: str, width: int, height: int,
              num_images: int = 1, guidance: float = 5.0) -> None:
    """Before anything loads (`python -m runtime generate`): RequestError when a width x height run of
    `num_images` images does not fit the build's engine profile (TensorRT) or, on ONNX Runtime, the
    memory its attention needs is more than this machine has now (`limits_for`, one request)."""
    from runtime.pipelines import PIPELINES
    from runtime.requests import RequestError

    engines = engine_max_side(build_dir, stepped_components([PIPELINES[pipeline]])) if _runs_engines(backend) else None
    if engines is not None and max(width, height) > engines:
        raise RequestError(f"{width}x{height} is larger than the build's engines allow ({engines} px per side): "
                           f"ask for at most {engines}x{engines}, or rebuild the engines for larger sizes")
    limits = limits_for(build_dir, backend, [pipeline])
    short = memory_shortfall(limits, width, height, num_images, guidance)
    if short is not None:
        need, side = short
        raise RequestError(f"{width}x{height} with {num_images} image(s) needs about {_gb(need)} for ONNX Runtime's "
                           f"attention and this machine has {_gb(limits.memory_bytes)} free for it: ask for at most "
                           f"{side}x{side} (the need grows with (width x height)^2), fewer images, or use a GPU "
                           "backend (--backend tensorrt)")


def _runs_engines(backend: str) -> bool:
    """Whether `backend` runs the build's TensorRT engines (whose profiles bound the sizes)."""
    return backend.strip().lower() not in ("onnxruntime", "ort", "torch", "pytorch")


def _gb(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
