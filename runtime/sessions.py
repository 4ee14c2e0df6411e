"""Engine sessions: one small interface over ONNX Runtime, TensorRT (`tensorrt` / `tensorrt_rtx`) and torch.

    session = open_session("build/tiny", "unet_instantid", "onnxruntime")
    outputs = session.run({"sample": latents, ...})        # dict[str, torch.Tensor] both ways

Every session (runtime/session_base.py) has `inputs` / `outputs` (engine.tensors.TensorSpec: name, torch
dtype, dims, min/max shapes if recorded), a `device` (of its outputs), `capturable` (`run` only enqueues on
the current CUDA stream, so a loop of calls can be captured in a CUDA graph), `bind(feeds)` (what a CUDA
graph calls: the session itself, or for TensorRT a context of its own) and `cuda` (runtime.streams.TorchCuda).

- `OrtSession` (runtime/ort.py): CPU, or the CUDA execution provider where onnxruntime-gpu is installed;
  torch tensors are bound in place (I/O binding), never copied through the host per call.
- `TorchSession`: a torch module with the engine's I/O (eager; capturable on CUDA); the `torch`
  backend loads the build's `torch.export` programs (torch/<component>.pt2) into it.
- `TrtSession` (runtime/trt.py): a checked plan (`EngineCheckError` says how to rebuild); eager calls
  on one context with output buffers per input shapes (the last few), valid until the next call with
  those shapes; `bind` gives each CUDA graph its own context; one shared `DeviceMemoryPool`.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from engine.backend import BackendError, load_backend, normalize_name
from engine.manifest import Manifest, build_path, load_manifest, sha256_files, verify_onnx
from engine.tensors import TensorSpec, torch_dtype
from runtime.ort import OrtSession
from runtime.session_base import Session, SessionError, ShapeRangeError, check_shape, cuda_device
from runtime.trt import DeviceMemoryPool, TrtBinding, TrtSession

__all__ = ["BACKENDS", "DeviceMemoryPool", "OrtSession", "Session", "SessionError", "ShapeRangeError", "TensorSpec",
           "TorchSession", "TrtBinding", "TrtSession", "check_shape", "cuda_device", "normalize_backend",
           "open_program", "open_session", "program_timings", "torch_sessions"]

log = logging.getLogger("runtime.sessions")

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch")


# ---- torch ---------------------------------------------------------------------------------------

class TorchSession(Session):
    """A torch module as a session: forward(*inputs in `inputs` order) -> outputs in `outputs` order.

    For the `export.components` wrappers (the engines' I/O); capturable on CUDA, so the loop runs in CUDA
    graphs on a GPU without TensorRT. Inputs are cast to their TensorSpec dtype; outputs keep theirs.
    timings: seconds per phase, {phase: s}: `open_program` adds 'checksum', 'load' (torch.export.load:
    deserialising the graph and its symbolic shapes, most of a program's start) and 'module'; the first
    run adds 'first_call', every run adds to 'calls' (with 'runs' counting them).
    """

    def __init__(self, module, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], name: str = "torch",
                 device: str | torch.device | None = None):
        parameter = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
        self.module, self.name = module, name
        self.inputs = tuple(replace(spec, dtype=torch_dtype(spec.dtype)) for spec in inputs)
        self.outputs = tuple(replace(spec, dtype=torch_dtype(spec.dtype)) for spec in outputs)
        self.device = cuda_device(device) if device is not None else (
            parameter.device if parameter is not None else torch.device("cpu"))
        self.capturable = self.device.type == "cuda"
        self.timings: dict[str, float] = {}

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs cast to their TensorSpec dtype on `device`; outputs as the module returns them."""
        self.check_feeds(feeds)
        args = [feeds[info.name].to(self.device, info.dtype) for info in self.inputs]
        start = time.perf_counter()
        with torch.inference_mode():
            result = self.module(*args)
        seconds = time.perf_counter() - start  # CPU: the call's time; CUDA: its launch (no sync here)
        self.timings.setdefault("first_call", seconds)
        self.timings["calls"] = self.timings.get("calls", 0.0) + seconds
        self.timings["runs"] = self.timings.get("runs", 0) + 1
        result = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        if len(result) != len(self.outputs):
            raise SessionError(f"{self.name}: the module returned {len(result)} tensors, expected "
                               f"{list(self.output_names)}")
        return dict(zip(self.output_names, result))


# ---- opening a build directory's component ----------------------------------------------------

def normalize_backend(backend: str) -> str:
    """'onnxruntime' | 'ort' -> 'onnxruntime'; 'torch'; TensorRT names via engine.backend ('tensorrt',
    'tensorrt-rtx')."""
    key = backend.strip().lower()
    if key in ("onnxruntime", "ort"):
        return "onnxruntime"
    if key in ("torch", "pytorch"):
        return "torch"
    try:
        return normalize_name(key)
    except BackendError:
        raise SessionError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}") from None


def open_session(build_dir: str | os.PathLike, component: str, backend: str = "onnxruntime", *,
                 manifest: Manifest | None = None, device: str | torch.device | None = None,
                 memory: DeviceMemoryPool | None = None,
                 verify_sha256: bool = True, threads: int | None = None, trust_programs: bool = False) -> Session:
    """The session of one component of a build directory.

    backend: 'onnxruntime' (onnx/<component>.onnx), 'tensorrt' / 'tensorrt-rtx' (its engine) or 'torch'
    (its torch.export program, torch/<component>.pt2; device default cuda when present).
    manifest: the loaded Manifest (read from build_dir when None).
    verify_sha256: hash the ONNX file (with its external data), the plan or the program against the
    manifest before loading (False: skip the hashing, for a faster start on a build you trust).
    trust_programs: the torch backend only: True to load torch.export programs, which unpickle (and so
    can run code); refused otherwise (see `open_program`).
    Raises SessionError / EngineCheckError / ManifestError with what to run to fix it.
    """
    build_dir = Path(build_dir)
    manifest = manifest or load_manifest(build_dir)
    entry = manifest.components.get(component)
    backend = normalize_backend(backend)
    if backend == "torch":
        return open_program(build_dir, component, manifest, device, verify_sha256, trust_programs)
    if entry is None or entry.onnx is None:
        raise SessionError(f"{build_dir} has no component '{component}' (it has {sorted(manifest.components)}); "
                           f"export it: python -m export.build --model {manifest.model} --out {build_dir}")
    if backend == "onnxruntime":
        files = verify_onnx(build_dir, component, entry.onnx, manifest.model, verify_sha256)
        return OrtSession(files[0], name=component, device=device, threads=threads)
    if entry.engine is None:
        raise SessionError(f"{build_dir}: '{component}' has no engine; build it: python -m export.build --model "
                           f"{manifest.model} --out {build_dir} --stage engines --backend {backend}")
    return TrtSession.from_plan(build_dir / entry.engine.path, entry.engine, load_backend(backend), name=component,
                                device=device or "cuda", memory=memory, verify_sha256=verify_sha256,
                                model=manifest.model)


def open_program(build_dir: Path, component: str, manifest: Manifest, device=None, verify_sha256: bool = True,
                 trust_programs: bool = False) -> TorchSession:
    """A TorchSession over the build's torch.export program of `component` (export/torch_programs.py),
    moved to `device` (default: cuda when present, else cpu).

    A program is loaded with `torch.export.load`, which unpickles parts of the archive with
    `weights_only=False` (torch 2.13: pickled weights and constants, and a fallback for the rest):
    a crafted .pt2 runs any code while it loads, and its manifest checksum, which lives in the same
    directory, proves nothing. So loading is a trust decision: without trust_programs=True this
    raises SessionError before the file is opened. SessionError also says how to export a missing one.
    """
    record = manifest.metadata.get("torch_programs", {}).get(component)
    path = None if record is None else build_path(build_dir, record["path"], f"'{component}' torch program")
    if not trust_programs:  # first: whichever component a pipeline opens first, the answer is the same
        raise SessionError(f"{path or component} is a torch.export program: loading it unpickles Python "
                           "objects, which can run any code its author put in it. Load torch programs only from a "
                           "build you made or trust: pass --trust-torch-programs (python -m runtime generate / serve, "
                           "benchmarks.latency) or trust_programs=True (Python API); otherwise serve this build "
                           "with --backend onnxruntime or tensorrt")
    if path is None or not path.is_file():
        raise SessionError(f"{build_dir} has no torch program for '{component}'; export it: python -m export.build "
                           f"--model {manifest.model} --out {build_dir} --stage torch")
    timings, start = {}, time.perf_counter()
    if verify_sha256 and sha256_files([path]) != record["sha256"]:
        raise SessionError(f"{path} does not match its manifest checksum (corrupt or replaced): re-export it "
                           f"(python -m export.build --model {manifest.model} --out {build_dir} --stage torch)")
    device = cuda_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timings["checksum"], start = time.perf_counter() - start, time.perf_counter()
    try:
        program = torch.export.load(path)
    except Exception as error:  # a truncated or foreign file; torch raises several kinds
        raise SessionError(f"torch {torch.__version__} cannot load {path} ({type(error).__name__}: {error}); "
                           f"it was saved by torch {record.get('torch')}: re-export it with this torch "
                           f"(python -m export.build --model {manifest.model} --out {build_dir} --stage torch)") from None
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)

    def spec(entry) -> TensorSpec:  # [name, dtype name, dims], as export.torch_programs.io_specs writes it
        name, dtype, dims = entry
        return TensorSpec(name, torch_dtype(dtype), tuple(dims))

    timings["load"], start = time.perf_counter() - start, time.perf_counter()
    module = program.module()
    timings["module"] = time.perf_counter() - start
    session = TorchSession(module, [spec(entry) for entry in record["inputs"]],
                           [spec(entry) for entry in record["outputs"]], name=component, device=device)
    session.timings.update(timings)
    log.info("%s: torch program opened in %.1f s (checksum %.2f s, torch.export.load %.1f s, module %.2f s)",
             component, sum(timings.values()), timings["checksum"], timings["load"], timings["module"])
    return session


def torch_sessions(owner) -> list[TorchSession]:
    """The TorchSessions among `owner`'s attributes and their attributes (a pipeline's components)."""
    found: dict[int, TorchSession] = {}
    for value in vars(owner).values():
        for candidate in [value, *getattr(value, "__dict__", {}).values()]:
            if isinstance(candidate, TorchSession):
                found[id(candidate)] = candidate
    return list(found.values())


def program_timings(sessions: Sequence[TorchSession], verbose: bool = False) -> list[str]:
    """Where the torch backend's time went, as lines: one summary (programs loaded, of which
    torch.export.load, first calls, then per call of the session that took longest in all, the UNet
    in a generation), and with `verbose`
    one line per session and phase. Seconds."""
    if not sessions:
        return []
    total = lambda phase: sum(session.timings.get(phase, 0.0) for session in sessions)  # noqa: E731
    opened = total("checksum") + total("load") + total("module")
    slowest = max(sessions, key=lambda session: session.timings.get("load", 0.0))
    busiest = max(sessions, key=lambda session: session.timings.get("calls", 0.0))  # the per-step one
    runs = busiest.timings.get("runs", 0)
    later = (busiest.timings.get("calls", 0.0) - busiest.timings.get("first_call", 0.0)) / max(runs - 1, 1)
    lines = [f"torch programs: {len(sessions)} opened in {opened:.1f} s (torch.export.load {total('load'):.1f} s, "
             f"most of it deserialising graphs and symbolic shapes; {slowest.name} {slowest.timings.get('load', 0):.1f} s), "
             f"first calls {total('first_call'):.1f} s, then {later:.2f} s per {busiest.name} call ({runs} calls)"]
    if verbose:
        for session in sessions:
            phases = ", ".join(f"{phase} {session.timings[phase]:.2f} s" for phase in
                               ("checksum", "load", "module", "first_call", "calls") if phase in session.timings)
            lines.append(f"  {session.name}: {phases}, {session.timings.get('runs', 0)} run(s)")
    return lines
