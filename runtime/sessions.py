"""Engine sessions: one small interface over ONNX Runtime, TensorRT (`tensorrt` / `tensorrt_rtx`).

    session = open_session("build/tiny", "unet_instantid", "onnxruntime")
    outputs = session.run({"sample": latents, ...})        # dict[str, torch.Tensor] both ways

Every session has `inputs` / `outputs` (`TensorInfo`: name, torch dtype, dims, min/max shapes if
recorded), a `device` (of its outputs), `capturable` (`run` only enqueues on the current CUDA
stream, so a loop of calls can be captured in a CUDA graph), `bind(feeds)` (what a CUDA graph calls:
the session itself, or for TensorRT a context of its own) and `cuda` (runtime.streams.TorchCuda).

- `OrtSession`: CPU, or the CUDA execution provider where onnxruntime-gpu is installed. Tensors
  cross the boundary as numpy arrays; inputs are cast to the graph's dtypes (fp16 graphs take
  fp32 tensors), outputs come back in the graph's dtypes.
- `TorchSession`: a torch module with the engine's I/O (eager; capturable on CUDA); the `torch`
  backend loads the build's `torch.export` programs (torch/<component>.pt2) into it.
- `TrtSession` (runtime/trt.py): a checked plan (`EngineCheckError` says how to rebuild); eager calls
  on one context with output buffers per input shapes (the last few), valid until the next call with
  those shapes; `bind` gives each CUDA graph its own context; one shared `DeviceMemoryPool`.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.streams import TORCH_CUDA

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_ORT_TYPES = {f"tensor({'float' if name == 'float32' else 'double' if name == 'float64' else name})": dtype
              for name, dtype in DTYPES.items()}
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch")


class SessionError(RuntimeError):
    """A session cannot be opened or was fed the wrong tensors; the message says what to do."""


class ShapeRangeError(SessionError, ValueError):
    """An input shape is outside the range the engine was built for."""


@dataclass(frozen=True)
class TensorInfo:
    """An engine input/output: name, torch dtype, dims (ints, axis names, or None), shape range.

    min / max: the smallest / largest shape the engine accepts (None where not recorded).
    """

    name: str
    dtype: torch.dtype
    shape: tuple
    min: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None


class Session:
    """Base of every session: metadata and the feed checks; subclasses implement `run`."""

    name: str = ""
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    device: torch.device = torch.device("cpu")
    capturable: bool = False
    cuda = TORCH_CUDA

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feeds: input name -> tensor (any device/dtype; cast as needed) -> output name -> tensor."""
        raise NotImplementedError

    def bind(self, feeds: Mapping[str, torch.Tensor], in_place: Collection[str] = (),
             outputs: Mapping[str, torch.Tensor] | None = None) -> Session:
        """What a CUDA graph at feeds' shapes calls `run` on: the session itself (no per-context state);
        TrtSession returns a context of its own bound to fixed buffers."""
        return self

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(info.name for info in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(info.name for info in self.outputs)

    def input(self, name: str) -> TensorInfo:
        """The TensorInfo of input `name`; SessionError listing the inputs if there is none."""
        for info in self.inputs:
            if info.name == name:
                return info
        raise SessionError(f"{self.name} has no input '{name}'; its inputs are {list(self.input_names)}")

    def check_feeds(self, feeds: Mapping[str, torch.Tensor]) -> None:
        """SessionError on missing/unknown names; ShapeRangeError on a shape outside the built range."""
        missing = [name for name in self.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self.input_names]
        if missing or unknown:
            raise SessionError(f"{self.name}: missing inputs {missing}, unknown inputs {unknown}; "
                               f"it takes {list(self.input_names)}")
        for info in self.inputs:
            check_shape(self.name, info, tuple(feeds[info.name].shape))


def check_shape(component: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
    """ShapeRangeError when `shape` does not fit info's rank, static dims or min/max range."""
    if len(shape) != len(info.shape):
        raise ShapeRangeError(f"{component} input '{info.name}' has shape {list(shape)}, expected rank "
                              f"{len(info.shape)} ({list(info.shape)})")
    for axis, (size, dim) in enumerate(zip(shape, info.shape)):
        if isinstance(dim, int) and dim > 0 and size != dim:
            raise ShapeRangeError(f"{component} input '{info.name}' axis {axis} is {size}, the model needs {dim}")
    if info.min is not None and info.max is not None and not all(
            lo <= size <= hi for size, lo, hi in zip(shape, info.min, info.max)):
        raise ShapeRangeError(f"{component} input '{info.name}' shape {list(shape)} is outside the engine's range "
                              f"{list(info.min)}..{list(info.max)}: use a size inside it, or rebuild the engine "
                              "with a wider profile (python -m export.build ... --stage engines)")


# ---- ONNX Runtime ------------------------------------------------------------------------------

class OrtSession(Session):
    """An ONNX graph in ONNX Runtime. providers: default CUDA EP when available (device 'cuda'), else CPU."""

    def __init__(self, onnx_path: str | os.PathLike, name: str | None = None, providers: Sequence | None = None,
                 device: str | torch.device | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise SessionError(f"{path} not found: export it first (python -m export.build --stage onnx --out "
                               f"{path.parent.parent})")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if "CUDAExecutionProvider" in available and torch.cuda.is_available():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as error:  # onnxruntime raises its own exception types
            raise SessionError(f"ONNX Runtime cannot load {path} ({error.__class__.__name__}: {error}); "
                               "re-export it") from None
        self.name = name or path.stem
        on_gpu = self._session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device(device if device is not None else ("cuda" if on_gpu else "cpu"))
        self.inputs = tuple(_ort_info(value) for value in self._session.get_inputs())
        self.outputs = tuple(_ort_info(value) for value in self._session.get_outputs())

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs cast to the graph's dtypes on the host; outputs (graph dtypes) moved to `device`."""
        self.check_feeds(feeds)
        arrays = {info.name: _to_numpy(feeds[info.name], info.dtype) for info in self.inputs}
        results = self._session.run(list(self.output_names), arrays)
        return {name: torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
                for name, array in zip(self.output_names, results)}


def _ort_info(value) -> TensorInfo:
    if value.type not in _ORT_TYPES:
        raise SessionError(f"input/output '{value.name}' has type {value.type}, which the runtime does not feed")
    shape = tuple(dim if isinstance(dim, int) else (dim or None) for dim in value.shape)
    return TensorInfo(value.name, _ORT_TYPES[value.type], shape)


def _to_numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    tensor = torch.as_tensor(tensor).detach()
    return np.ascontiguousarray(tensor.to(device="cpu", dtype=dtype).numpy())


# ---- TensorRT: runtime/trt.py (TrtSession, TrtBinding, DeviceMemoryPool) ------------------------

def cuda_device(device: str | torch.device = "cuda") -> torch.device:
    """torch.device with its index ('cuda' -> 'cuda:<current>'), so device comparisons are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device



def __getattr__(name: str):
    """TrtSession, TrtBinding and DeviceMemoryPool live in runtime.trt (imported on first use)."""
    if name in ("TrtSession", "TrtBinding", "DeviceMemoryPool"):
        from runtime import trt

        return getattr(trt, name)
    raise AttributeError(f"module 'runtime.sessions' has no attribute '{name}'")


# ---- torch ---------------------------------------------------------------------------------------

class TorchSession(Session):
    """A torch module as a session: forward(*inputs in `inputs` order) -> outputs in `outputs` order.

    For the `export.components` wrappers (the engines' I/O); capturable on CUDA, so the loop runs in CUDA
    graphs on a GPU without TensorRT. Inputs are cast to their TensorInfo dtype; outputs keep theirs.
    """

    def __init__(self, module, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], name: str = "torch",
                 device: str | torch.device | None = None):
        parameter = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
        self.module, self.name, self.inputs, self.outputs = module, name, tuple(inputs), tuple(outputs)
        self.device = cuda_device(device) if device is not None else (
            parameter.device if parameter is not None else torch.device("cpu"))
        self.capturable = self.device.type == "cuda"

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs cast to their TensorInfo dtype on `device`; outputs as the module returns them."""
        self.check_feeds(feeds)
        args = [feeds[info.name].to(self.device, info.dtype) for info in self.inputs]
        with torch.inference_mode():
            result = self.module(*args)
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
    from engine.backend import BackendError, normalize_name

    try:
        return normalize_name(key)
    except BackendError:
        raise SessionError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}") from None


def open_session(build_dir: str | os.PathLike, component: str, backend: str = "onnxruntime", *,
                 manifest=None, device: str | torch.device | None = None, memory: DeviceMemoryPool | None = None,
                 verify_sha256: bool = True, threads: int | None = None, trust_programs: bool = False) -> Session:
    """The session of one component of a build directory.

    backend: 'onnxruntime' (onnx/<component>.onnx), 'tensorrt' / 'tensorrt-rtx' (its engine) or 'torch'
    (its torch.export program, torch/<component>.pt2; device default cuda when present).
    manifest: the loaded engine.manifest.Manifest (read from build_dir when None).
    verify_sha256: hash the ONNX file (with its external data), the plan or the program against the
    manifest before loading (False: skip the hashing, for a faster start on a build you trust).
    trust_programs: the torch backend only: True to load torch.export programs, which unpickle (and so
    can run code); refused otherwise (see `open_program`).
    Raises SessionError / EngineCheckError / ManifestError with what to run to fix it.
    """
    from engine.manifest import load_manifest

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
        from engine.manifest import verify_onnx

        files = verify_onnx(build_dir, component, entry.onnx, manifest.model, verify_sha256)
        return OrtSession(files[0], name=component, device=device, threads=threads)
    if entry.engine is None:
        raise SessionError(f"{build_dir}: '{component}' has no engine; build it: python -m export.build --model "
                           f"{manifest.model} --out {build_dir} --stage engines --backend {backend}")
    from engine.backend import load_backend
    from runtime.trt import TrtSession

    return TrtSession.from_plan(build_dir / entry.engine.path, entry.engine, load_backend(backend), name=component,
                                device=device or "cuda", memory=memory, verify_sha256=verify_sha256,
                                model=manifest.model)


def open_program(build_dir: Path, component: str, manifest, device=None, verify_sha256: bool = True,
                 trust_programs: bool = False) -> TorchSession:
    """A TorchSession over the build's torch.export program of `component` (export/torch_programs.py),
    moved to `device` (default: cuda when present, else cpu).

    A program is loaded with `torch.export.load`, which unpickles parts of the archive with
    `weights_only=False` (torch 2.13: pickled weights and constants, and a fallback for the rest):
    a crafted .pt2 runs any code while it loads, and its manifest checksum, which lives in the same
    directory, proves nothing. So loading is a trust decision: without trust_programs=True this
    raises SessionError before the file is opened. SessionError also says how to export a missing one.
    """
    from engine.manifest import build_path, sha256_files

    record = manifest.metadata.get("torch_programs", {}).get(component)
    path = None if record is None else build_path(build_dir, record["path"], f"'{component}' torch program")
    if path is None or not path.is_file():
        raise SessionError(f"{build_dir} has no torch program for '{component}'; export it: python -m export.build "
                           f"--model {manifest.model} --out {build_dir} --stage torch")
    if not trust_programs:
        raise SessionError(f"{path} is a torch.export program: loading it unpickles Python objects, which can run "
                           "any code its author put in it. Load torch programs only from a build you made or "
                           "trust: pass --trust-torch-programs (python -m runtime generate / serve, "
                           "benchmarks.latency) or trust_programs=True (Python API); otherwise serve this build "
                           "with --backend onnxruntime or tensorrt")
    if verify_sha256 and sha256_files([path]) != record["sha256"]:
        raise SessionError(f"{path} does not match its manifest checksum (corrupt or replaced): re-export it "
                           f"(python -m export.build --model {manifest.model} --out {build_dir} --stage torch)")
    device = cuda_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        program = torch.export.load(path)
    except Exception as error:  # a truncated or foreign file; torch raises several kinds
        raise SessionError(f"torch {torch.__version__} cannot load {path} ({type(error).__name__}: {error}); "
                           f"it was saved by torch {record.get('torch')}: re-export it with this torch "
                           f"(python -m export.build --model {manifest.model} --out {build_dir} --stage torch)") from None
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)

    def info(spec) -> TensorInfo:
        name, dtype, dims = spec
        return TensorInfo(name, DTYPES[dtype], tuple(dims))

    return TorchSession(program.module(), [info(spec) for spec in record["inputs"]],
                        [info(spec) for spec in record["outputs"]], name=component, device=device)
