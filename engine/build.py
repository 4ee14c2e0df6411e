"""ONNX -> TensorRT plan for one component, with a manifest EngineRecord describing it.

Networks are always strongly typed: an FP16 engine comes from an FP16-typed ONNX, never from a
precision flag. The ONNX is parsed from its file path, so models with external data (> 2 GB)
work. Everything the two backends do differently is asked of `backend.caps`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from engine.backend import Backend, BackendError, detect_gpu, load_backend, refit_build_blocker
from engine.manifest import BuildFlags, EngineRecord, atomic_write, sha256_files
from engine.profiles import Profile, ShapeRange, output_range, solve_symbols
from engine.tensors import TensorSpec, onnx_io, trt_dtype

CPU_BUILD = "cpu (ahead-of-time)"
log = logging.getLogger("engine")
_ACTIVATION = re.compile(r"Total Activation Memory:\s*(\d+)")


class OnnxParseError(RuntimeError):
    """The ONNX parser rejected nodes; `.nodes` lists (node name, op type, description)."""

    def __init__(self, message: str, nodes: list[tuple[str, str, str]]):
        super().__init__(message)
        self.nodes = nodes


class EngineBuildError(RuntimeError):
    """The builder could not produce a plan; the message carries the builder's own errors."""


def build_engine(onnx_path: str | Path, plan_path: str | Path, profiles: Sequence[Profile],
                 backend: Backend | str | None, *, workspace_gb: float | None = None,
                 opt_level: int = 3, refittable: bool = False, strip_plan: bool = False,
                 compute_capabilities: Sequence[str] | None = None, user_allocation: bool = False,
                 timing_cache: str | Path | None = None, onnx_sha256: str | None = None) -> EngineRecord:
    """Parse `onnx_path`, build a strongly typed engine, write it to `plan_path`.

    profiles: optimisation profiles (input name -> ShapeRange), e.g. [profile_for(dims, geometry)];
        may be empty only when no input has a dynamic axis.
    backend: a Backend, its name ("tensorrt" | "tensorrt-rtx") or None (detect).
    workspace_gb: workspace memory pool limit (None: backend default).
    opt_level: builder optimisation level 0..5 (higher: slower build, maybe faster engine).
    refittable: weights can be replaced by another checkpoint's later (engine.refit; plain REFIT,
        which NVIDIA documents may drop a GEMM bias even without a refit: prefer rebuilding).
    strip_plan: leave the weights out of the plan (REFIT_IDENTICAL: they must be refilled from
        this ONNX by engine.refit.refit_engine on the target GPU; the runtime refuses such a plan).
    compute_capabilities: e.g. ["sm86", "sm89"] for ahead-of-time builds (tensorrt-rtx only).
    user_allocation: REQUIRE_USER_ALLOCATION, for plans the runtime captures in CUDA graphs
        (TensorRT-RTX needs it for stream capture); ignored where the backend lacks the flag.
    timing_cache: file to read and update (tensorrt only; tensorrt-rtx has no timing cache).
    onnx_sha256: the ONNX checksum if the caller already has it (else it is computed).
    Returns the EngineRecord (path relative to the build directory: "engines/<c>.plan").
    Raises OnnxParseError naming the rejected nodes, EngineBuildError, BackendError, ValueError.
    """
    backend = backend if isinstance(backend, Backend) else load_backend(backend)
    trt = backend.trt
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    flags = BuildFlags(opt_level, workspace_gb, refittable, strip_plan,
                       tuple(s.lower() for s in compute_capabilities) if compute_capabilities else None,
                       user_allocation and backend.caps.user_allocation)
    _check_options(backend, flags, timing_cache)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist: export the component first")

    start = time.perf_counter()
    logger = backend.logger()
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise parser_error(parser, onnx_path, backend)

    config = builder.create_builder_config()
    _configure(config, backend, flags)
    _add_profiles(builder, network, config, profiles, onnx_path)
    if timing_cache is not None:
        cache_bytes = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), False)

    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start  # parse + build
    if plan is None:
        errors = "\n  ".join(logger.errors[-5:]) or "(no error logged)"
        raise EngineBuildError(f"{backend.name} {backend.version} could not build {onnx_path} "
                               f"(opt_level {opt_level}):\n  {errors}\nRun with logging at DEBUG "
                               "(logger 'engine.trt') for the builder's full log.")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(plan_path, memoryview(plan))
    if timing_cache is not None:
        atomic_write(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))

    io = onnx_io(onnx_path)
    onnx_files = [onnx_path] + [onnx_path.parent / name for name in io.external_data]
    gpu = detect_gpu()
    if flags.compute_capabilities:
        targets = flags.compute_capabilities
    elif backend.caps.compute_capabilities:
        targets = backend.caps.default_targets
    else:
        targets = (gpu.sm,) if gpu else ()
    return EngineRecord(
        path=os.path.relpath(plan_path, plan_path.parent.parent), onnx_sha256=onnx_sha256 or sha256_files(onnx_files),
        backend=backend.name, backend_version=backend.version, compute_capabilities=tuple(targets),
        build_device=gpu.name if gpu else CPU_BUILD, flags=flags, profiles=tuple(profiles),
        inputs=tuple(_engine_tensors(network, True, io.inputs, profiles)),
        outputs=tuple(_engine_tensors(network, False, io.outputs, profiles, io.inputs)),
        build_seconds=round(seconds, 3), plan_bytes=plan.nbytes,
        plan_sha256=hashlib.sha256(memoryview(plan)).hexdigest(),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        activation_bytes=activation_bytes(logger.infos))


def activation_bytes(builder_log: Sequence[str]) -> int | None:
    """The scratch memory a context of the built engine needs, from the builder's INFO line
    'Total Activation Memory: N bytes' (the largest shapes of its profiles); None if absent."""
    found = [int(m.group(1)) for line in builder_log if (m := _ACTIVATION.search(line))]
    return found[-1] if found else None


def _check_options(backend: Backend, flags: BuildFlags, timing_cache) -> None:
    if not 0 <= flags.opt_level <= 5:
        raise ValueError(f"opt_level {flags.opt_level} is outside 0..5")
    if flags.workspace_gb is not None and flags.workspace_gb <= 0:
        raise ValueError(f"workspace_gb {flags.workspace_gb} must be positive (or None for the default)")
    if timing_cache is not None and not backend.caps.timing_cache:
        raise ValueError(f"{backend.name} {backend.version} has no timing cache (it compiles kernels "
                         "when the engine is loaded); pass timing_cache=None")
    if flags.compute_capabilities:
        for sm in flags.compute_capabilities:
            backend.compute_capability(sm)  # BackendError naming the valid targets
    if flags.refittable or flags.strip_plan:
        blocker = refit_build_blocker(backend)
        if blocker:
            raise EngineBuildError(f"{blocker}. Build without refittable/strip_plan here, or on a "
                                   "machine with an NVIDIA GPU and driver.")
        if flags.strip_plan and not backend.caps.strip_plan:
            raise BackendError(f"{backend.name} {backend.version} cannot strip weights from plans")


def _configure(config, backend: Backend, flags: BuildFlags) -> None:
    trt = backend.trt
    config.builder_optimization_level = flags.opt_level
    if flags.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(flags.workspace_gb * (1 << 30)))
    if flags.refittable:  # new checkpoints later: only plain REFIT allows other weights
        log.warning("REFIT: NVIDIA documents that refittable engines may drop a GEMM bias (wrong "
                    "results even without a refit); compare against the ONNX before serving it")
        config.set_flag(trt.BuilderFlag.REFIT)
    if flags.strip_plan:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        if not flags.refittable:  # the same weights come back from the same ONNX
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL if backend.caps.refit_identical
                            else trt.BuilderFlag.REFIT)
    if flags.user_allocation:
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    if flags.compute_capabilities:
        config.num_compute_capabilities = len(flags.compute_capabilities)
        for index, sm in enumerate(flags.compute_capabilities):
            config.set_compute_capability(backend.compute_capability(sm), index)


def parser_error(parser, onnx_path: Path, backend: Backend) -> OnnxParseError:
    """An OnnxParseError listing each parser error with node name, op type and description."""
    nodes, lines = [], []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        name = _call(error, "node_name") or (f"#{error.node()}" if error.node() >= 0 else "<graph>")
        op = _call(error, "node_operator") or "?"
        desc = " ".join(error.desc().split())
        nodes.append((name, op, desc))
        lines.append(f"node '{name}' (op {op}, index {error.node()}): {desc} [{error.code()}]")
    message = (f"{backend.name} {backend.version} could not parse {onnx_path}: "
               f"{len(lines)} error(s)\n  " + "\n  ".join(lines or ["(no parser error recorded)"]) +
               "\nFix or replace these nodes in the exporter (check the op, its attributes and "
               "input shapes), then re-export.")
    return OnnxParseError(message, nodes)


def _call(error, method: str) -> str:
    """ParserError.node_name()/node_operator() where the backend has them (TensorRT >= 10)."""
    return getattr(error, method)() if hasattr(error, method) else ""


def _add_profiles(builder, network, config, profiles: Sequence[Profile], onnx_path: Path) -> None:
    tensors = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    dynamic = [name for name, t in tensors.items() if -1 in tuple(t.shape)]
    if not profiles:
        if dynamic:
            raise ValueError(f"{onnx_path}: inputs {dynamic} have dynamic axes but no profile was "
                             "given; pass [engine.profiles.profile_for(dims, geometry)]")
        return
    for index, profile in enumerate(profiles):
        unknown = sorted(set(profile) - set(tensors))
        missing = sorted(set(dynamic) - set(profile))
        if unknown or missing:
            raise ValueError(f"{onnx_path}: profile {index} names inputs the network lacks {unknown} "
                             f"or misses dynamic inputs {missing}; network inputs: {sorted(tensors)}")
        trt_profile = builder.create_optimization_profile()
        for name, shapes in profile.items():
            _check_shape(name, tuple(tensors[name].shape), shapes, onnx_path)
            trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise ValueError(f"{onnx_path}: profile {index} was rejected by the builder: {profile}")


def _check_shape(name: str, network_shape: tuple, shapes: ShapeRange, onnx_path: Path) -> None:
    for shape in (shapes.min, shapes.opt, shapes.max):
        if len(shape) != len(network_shape) or any(
                fixed != -1 and fixed != size for fixed, size in zip(network_shape, shape)):
            raise ValueError(f"{onnx_path}: input '{name}' has shape {list(network_shape)} (-1 = dynamic); "
                             f"profile shape {list(shape)} does not fit it")


def _engine_tensors(network, is_input: bool, onnx_tensors: Sequence[TensorSpec], profiles: Sequence[Profile],
                    onnx_inputs: Sequence[TensorSpec] = ()):
    """The network's inputs (or outputs) as TensorSpecs: the plan's dtype, the ONNX dims with their axis
    names, and the shape range over all profiles (outputs: as far as the axis names determine it)."""
    symbolic = {t.name: t.shape for t in onnx_tensors}
    count = network.num_inputs if is_input else network.num_outputs
    for index in range(count):
        tensor = network.get_input(index) if is_input else network.get_output(index)
        dims = tuple(tensor.shape)
        shape = symbolic.get(tensor.name) or dims
        if not any(isinstance(d, str) or d == -1 for d in shape):  # static: ranges are the shape
            ranges = [ShapeRange(dims, dims, dims)]
        elif is_input:
            ranges = [p[tensor.name] for p in profiles if tensor.name in p]
        else:
            by_name = {t.name: t.shape for t in onnx_inputs}
            ranges = [output_range(shape, solve_symbols(by_name, p)) for p in profiles]
        if ranges and None not in ranges:
            low = tuple(min(r.min[i] for r in ranges) for i in range(len(dims)))
            high = tuple(max(r.max[i] for r in ranges) for i in range(len(dims)))
            yield TensorSpec(tensor.name, trt_dtype(tensor.dtype), shape, low, ranges[0].opt, high)
        else:
            yield TensorSpec(tensor.name, trt_dtype(tensor.dtype), shape)
