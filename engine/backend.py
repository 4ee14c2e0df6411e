"""One engine layer over `tensorrt` (10.x / 11.x) and `tensorrt_rtx` (1.x).

The two share the builder/parser/runtime API. Where they differ, code asks a `Capabilities`
field (probed from the loaded module, never from its name) instead of branching on the
backend:

    strongly_typed_flag   NetworkDefinitionCreationFlag.STRONGLY_TYPED exists (we always pass it)
    weak_typing           BuilderFlag.FP16 exists: without the flag the network would be weakly
                          typed (TensorRT 10.x), so the flag is *needed*
    timing_cache          builder timing caches do something (no-ops in TensorRT-RTX)
    compute_capabilities  IBuilderConfig.set_compute_capability: ahead-of-time builds for chosen
                          GPU architectures, no GPU needed (TensorRT-RTX)
    runtime_cache         IRuntimeConfig.create_runtime_cache (JIT kernel cache, TensorRT-RTX)
    cuda_graph_strategy   IRuntimeConfig.cuda_graph_strategy (built-in CUDA graphs, TensorRT-RTX)
    refit, refit_identical, refit_individual, strip_plan   the BuilderFlag members exist
    user_allocation       BuilderFlag.REQUIRE_USER_ALLOCATION: the plan never allocates on its own
                          during enqueue (TensorRT-RTX needs it for CUDA-graph capture)
    serialization_config  ICudaEngine.serialize_with_config + SerializationFlag.EXCLUDE_WEIGHTS:
                          a refitted weight-stripped engine can be written back WITH its weights

Backends are named as on the command line: "tensorrt" or "tensorrt-rtx".
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

log = logging.getLogger("engine.trt")

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_ALIASES = {"tensorrt_rtx": "tensorrt-rtx", "rtx": "tensorrt-rtx", "trt": "tensorrt"}
INSTALL_HINT = {
    "tensorrt": 'pip install --extra-index-url https://pypi.nvidia.com ".[tensorrt]" (needs an NVIDIA GPU)',
    "tensorrt-rtx": 'pip install ".[rtx]" (tensorrt-rtx-cu12; builds ahead of time on a CPU)',
}


class BackendError(RuntimeError):
    """The requested TensorRT backend cannot be loaded or cannot do what was asked."""


@dataclass(frozen=True)
class Capabilities:
    """What the loaded TensorRT module can do; see the module docstring for each field."""

    strongly_typed_flag: bool
    weak_typing: bool
    timing_cache: bool
    compute_capabilities: bool
    default_targets: tuple[str, ...]   # archs an AOT build targets when none are set ("sm80", ...)
    runtime_cache: bool
    cuda_graph_strategy: bool
    refit: bool
    refit_identical: bool
    refit_individual: bool
    strip_plan: bool
    user_allocation: bool
    serialization_config: bool


@dataclass(frozen=True)
class Backend:
    """A loaded TensorRT module with its name, version and capabilities.

    name: "tensorrt" | "tensorrt-rtx"; version: the module's __version__; trt: the module.
    """

    name: str
    version: str
    caps: Capabilities
    trt: ModuleType = field(compare=False, repr=False)

    def network_flags(self) -> int:
        """Creation flags for a strongly typed network (0 where strong typing is the only kind)."""
        if self.caps.strongly_typed_flag:
            return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if self.caps.weak_typing:
            raise BackendError(f"{self.name} {self.version} cannot build strongly typed networks; "
                               "install TensorRT >= 10.8")
        return 0

    def logger(self):
        """The process-wide trt.ILogger, its `.errors` / `.warnings` / `.infos` lists emptied.

        TensorRT keeps the first logger a process gives it and ignores later ones, so every
        builder, parser, runtime and refitter here shares this one; it forwards to
        logging('engine.trt').
        """
        shared = _shared_logger(self.trt)
        shared.errors.clear()
        shared.warnings.clear()
        shared.infos.clear()
        return shared

    def compute_capability(self, sm: str):
        """The module's ComputeCapability member for "sm89" / "SM89"; BackendError if unknown."""
        if not self.caps.compute_capabilities:
            raise BackendError(f"{self.name} builds for the GPU it runs on; leave compute_capabilities unset")
        members = self.trt.ComputeCapability.__members__
        key = sm.upper()
        if key not in members or key in ("NONE", "CURRENT"):
            known = [m.lower() for m in members if m.startswith("SM")]
            raise BackendError(f"{self.name} {self.version} cannot target '{sm}'; choose from {known}")
        return members[key]


@functools.lru_cache(maxsize=None)
def _shared_logger(trt: ModuleType):
    severity = trt.ILogger.Severity

    class _Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.infos: list[str] = []  # the builder's INFO lines (memory totals, ...)
            self.verbose: list[str] | None = None  # VERBOSE lines, kept only while a list (engine.fusion)

        def log(self, level, message):
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                if "Thread context has not been set" not in message:
                    self.errors.append(message)
                    log.debug("%s", message)   # surfaced in the exception that follows
            elif level == severity.WARNING:
                self.warnings.append(message)
                log.warning("%s", message)
            elif level == severity.INFO:
                self.infos.append(message)
                log.debug("%s", message)
            elif level == severity.VERBOSE and self.verbose is not None:
                self.verbose.append(message)

    return _Log()


def normalize_name(name: str) -> str:
    """Canonical backend name: "tensorrt" or "tensorrt-rtx" (accepts tensorrt_rtx, rtx, trt)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in MODULES:
        raise BackendError(f"unknown backend '{name}'; choose one of {sorted(MODULES)}")
    return key


@functools.lru_cache(maxsize=None)
def load_backend(name: str | None = None) -> Backend:
    """Import a TensorRT backend and probe its capabilities.

    name: "tensorrt" | "tensorrt-rtx" | None (None: tensorrt if importable, else tensorrt-rtx).
    Returns a Backend; BackendError with the install command when none can be imported.
    """
    names = [normalize_name(name)] if name else list(MODULES)
    failures = []
    for candidate in names:
        try:
            trt = importlib.import_module(MODULES[candidate])
            version = trt.__version__
        except Exception as error:  # the PyPI `tensorrt` stub raises at import, not ImportError
            failures.append(f"{candidate}: {error.__class__.__name__}: {error}")
            continue
        return Backend(candidate, version, _probe(trt), trt)
    hints = "; ".join(f"{n}: {INSTALL_HINT[n]}" for n in names)
    raise BackendError(f"no TensorRT backend could be imported ({'; '.join(failures)}). Install one: {hints}")


def _probe(trt: ModuleType) -> Capabilities:
    flags = trt.BuilderFlag.__members__
    runtime_config = getattr(trt, "IRuntimeConfig", None)
    compute = hasattr(trt, "ComputeCapability") and hasattr(trt.IBuilderConfig, "set_compute_capability")
    targets = ()
    if compute:  # documented AOT default: every listed architecture from Ampere on
        targets = tuple(m.lower() for m in trt.ComputeCapability.__members__
                        if m.startswith("SM") and int(m[2:]) >= 80)
    return Capabilities(
        strongly_typed_flag="STRONGLY_TYPED" in trt.NetworkDefinitionCreationFlag.__members__,
        weak_typing="FP16" in flags,
        timing_cache=_timing_cache_works(trt),
        compute_capabilities=compute,
        default_targets=targets,
        runtime_cache=runtime_config is not None and hasattr(runtime_config, "create_runtime_cache"),
        cuda_graph_strategy=runtime_config is not None and hasattr(runtime_config, "cuda_graph_strategy"),
        refit="REFIT" in flags,
        refit_identical="REFIT_IDENTICAL" in flags,
        refit_individual="REFIT_INDIVIDUAL" in flags,
        strip_plan="STRIP_PLAN" in flags,
        user_allocation="REQUIRE_USER_ALLOCATION" in flags,
        serialization_config=hasattr(trt.ICudaEngine, "serialize_with_config")
        and "EXCLUDE_WEIGHTS" in getattr(getattr(trt, "SerializationFlag", None), "__members__", {}),
    )


def _timing_cache_works(trt: ModuleType) -> bool:
    """True unless the module lacks timing caches or flags them as deprecated no-ops."""
    if not hasattr(trt.IBuilderConfig, "create_timing_cache"):
        return False
    try:
        config = trt.Builder(_shared_logger(trt)).create_builder_config()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config.set_timing_cache(config.create_timing_cache(b""), False)
    except Exception:  # full TensorRT without a GPU cannot make a builder: trust the API
        return True
    return not any(issubclass(w.category, DeprecationWarning) for w in caught)


@functools.lru_cache(maxsize=None)
def refit_build_blocker(backend: Backend) -> str | None:
    """Why refittable engines cannot be built on this machine, or None if they can.

    Builds a one-weight network with REFIT (well under a second). TensorRT-RTX 1.7 on a machine
    without a CUDA driver fails here even though plain builds work ahead of time.
    """
    trt = backend.trt
    if not backend.caps.refit:
        return f"{backend.name} {backend.version} has no BuilderFlag.REFIT"
    logger = backend.logger()
    builder = trt.Builder(logger)
    network = builder.create_network(backend.network_flags())
    x = network.add_input("x", trt.float32, (1, 4))
    weight = network.add_constant((1, 4), trt.Weights(np.ones((1, 4), np.float32)))
    out = network.add_elementwise(x, weight.get_output(0), trt.ElementWiseOperation.SUM)
    network.mark_output(out.get_output(0))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)
    if builder.build_serialized_network(network, config) is None:
        detail = logger.errors[-1] if logger.errors else "no error logged"
        gpu = detect_gpu()
        where = f"on {gpu.name}" if gpu else "on this machine without a CUDA driver"
        return (f"{backend.name} {backend.version} cannot build refittable engines {where} "
                f"({detail[:200]})")
    return None


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a process would run engines on: name and compute capability (major, minor)."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        """Compute capability as an architecture name, e.g. "sm89"."""
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


@functools.lru_cache(maxsize=None)
def detect_gpu(index: int = 0) -> GpuInfo | None:
    """GPU `index` as the CUDA driver sees it (honours CUDA_VISIBLE_DEVICES); None without one.

    Uses the driver library through ctypes, so it needs neither torch nor cuda-python.
    """
    for library in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
            break
        except OSError:
            continue
    else:
        return None
    count, device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) or cuda.cuDeviceGetCount(ctypes.byref(count)) or count.value <= index:
        return None
    if cuda.cuDeviceGet(ctypes.byref(device), index):
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) or \
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device):
        return None
    cuda.cuDeviceGetName(name, len(name), device)
    return GpuInfo(name.value.decode(errors="replace"), (major.value, minor.value))
