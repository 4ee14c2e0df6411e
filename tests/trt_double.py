"""A strict test double of the TensorRT execution API and of CUDA streams/graphs, for a machine without a GPU.

Only what runtime/trt.py, runtime/streams.py and runtime/loop.py call is here. Tensors are torch CPU
tensors; an address is `tensor.data_ptr()`, and an enqueue really reads its inputs from, and writes
its outputs to, the bound addresses (ctypes views of that memory), so a wrong, stale or aliased
binding gives wrong numbers. Outputs are a deterministic function of the inputs (`EngineSpec.compute`).

Rules enforced, each as the TensorRT / TensorRT-RTX documentation states it:
- IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment"; "Return
  false if the provided name does not map to an input or output tensor." -> False for a misaligned
  address or an unknown name.
- setInputShape: "True on success, false if the provided name does not map to an input tensor, or if
  some other error occurred" (a shape outside the optimization profile, a wrong rank) -> False.
- enqueueV3 needs every input shape specified ("all input shapes must be specified before execute",
  `infer_shapes` / allInputShapesSpecified) and every I/O address set -> False otherwise; a context
  keeps its own shapes and addresses (one context never sees another's).
- execute_async_v3: "Using default stream may lead to performance issues due to additional
  cudaDeviceSynchronize() calls ... Please use non-default stream instead." -> handle 0 raises
  ContractError here (strict: the runtime must never do it).
- ExecutionContextAllocationStrategy.USER_MANAGED: the context has no scratch memory until
  set_device_memory(address, size) gives it 256-byte aligned memory of at least
  device_memory_size_v2 bytes ("memory: 256-byte aligned device memory"; "This must be at least as
  large as CudaEngine.get_device_memory_size_v2") -> ContractError otherwise; enqueue without it -> False.
- Developer guide, CUDA graphs: the first enqueue after a shape change may perform deferred updates
  that cannot be captured, so "call enqueue once before capture" -> an enqueue captured on a context
  that was not enqueued outside capture at those shapes fails (False). A captured graph holds its
  context's state, so a context belongs to one graph (captured in a second one -> ContractError), is
  not used for eager calls afterwards (ContractError), and a replay whose context state (shapes,
  addresses, scratch memory) changed since capture raises ContractError.
- TensorRT-RTX IRuntimeConfig: LAZY dynamic-shape kernel specialisation (the default) runs fallback
  kernels until the specialised ones are compiled in the background; captured, the fallback kernels
  would be frozen into the graph -> capturing a context whose config is LAZY raises ContractError.
  `is_stream_capturable(stream)` answers `EngineSpec.stream_capturable`.

`FakeCuda` stands in for runtime.streams.TorchCuda (it inherits `fork`, the production fork/join):
streams are handles (0 is the legacy default stream), and a graph capture runs the body once with the
stream marked as capturing (TensorRT enqueues are recorded, not run); `replay()` runs the body again
with TensorRT contexts in replay mode and copies its results into the tensors the capture returned, as a
replayed graph writes the same buffers. That fake capture lives only here: the runtime's own binding,
warm-up and capture code is what the tests exercise.
"""
from __future__ import annotations

import ctypes
import enum
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.tensors import torch_dtype, trt_dtype
from runtime.streams import TorchCuda

ALIGNMENT = 256


class ContractError(AssertionError):
    """The runtime broke a rule of the TensorRT / CUDA contract (the message cites it)."""


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class DynamicShapesKernelSpecializationStrategy(enum.Enum):
    LAZY = 0
    EAGER = 1
    NONE = 2


class CudaGraphStrategy(enum.Enum):
    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


class TrtModule:
    """The module namespace the session reads enums from: 'tensorrt' (10.x) or 'tensorrt-rtx' (1.x)."""

    DataType = DataType
    TensorIOMode = TensorIOMode
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy

    def __init__(self, flavour: str = "tensorrt"):
        self.flavour = flavour
        if flavour == "tensorrt-rtx":
            self.DynamicShapesKernelSpecializationStrategy = DynamicShapesKernelSpecializationStrategy
            self.CudaGraphStrategy = CudaGraphStrategy


# ---- CUDA ----------------------------------------------------------------------------------------

class FakeStream:
    """A CUDA stream: a handle (0 = legacy default), the handles it waited for, the graph capturing it."""

    def __init__(self, handle: int):
        self.cuda_stream = handle
        self.waited: list[int] = []
        self.capturing: FakeGraph | None = None

    def wait_stream(self, other: FakeStream) -> None:
        self.waited.append(other.cuda_stream)


class FakeGraph:
    """A captured body; `replay()` runs it in replay mode and writes its results into the captured ones."""

    def __init__(self, cuda: FakeCuda):
        self.cuda, self.body, self.result, self.replays = cuda, None, None, 0
        self.contexts: list = []

    def replay(self) -> None:
        if self.body is None:
            raise ContractError("replay() of a graph that was never captured")
        self.cuda.replaying, self.replays = self, self.replays + 1
        try:
            fresh = self.body()
        finally:
            self.cuda.replaying = None
        for target, value in zip(_tensors(self.result), _tensors(fresh)):
            target.copy_(value)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return list(value.values())
    return list(value)


class FakeCuda(TorchCuda):
    """runtime.streams.TorchCuda for CPU tensors: handles instead of streams, fake capture (see module doc)."""

    def __init__(self):
        self.default = FakeStream(0)
        self.streams = {0: self.default}
        self._current = [self.default]
        self.replaying: FakeGraph | None = None
        self.graphs: list[FakeGraph] = []

    def available(self, device) -> bool:
        return True

    def new_stream(self, device) -> FakeStream:
        stream = FakeStream(len(self.streams) * 16 + 7)
        self.streams[stream.cuda_stream] = stream
        return stream

    def current_stream(self, device) -> FakeStream:
        return self._current[-1]

    @contextmanager
    def use(self, stream: FakeStream):
        self._current.append(stream)
        try:
            yield stream
        finally:
            self._current.pop()

    def keep_alive(self, tensor, stream) -> None:
        pass

    def new_graph(self) -> FakeGraph:
        return FakeGraph(self)

    def graph_pool(self):
        return object()

    def capture(self, graph: FakeGraph, stream: FakeStream, body: Callable[[], object], pool=None):
        if stream.cuda_stream == 0:
            raise ContractError("CUDA cannot capture the legacy default stream")
        if graph.body is not None:
            raise ContractError("a CUDA graph is captured once")
        stream.capturing = graph
        try:
            with self.use(stream):
                result = body()
        finally:
            stream.capturing = None
        graph.body, graph.result = body, result
        self.graphs.append(graph)
        return result

    def synchronize(self, device) -> None:
        pass


# ---- TensorRT ------------------------------------------------------------------------------------

@dataclass
class EngineSpec:
    """What an engine double computes.

    inputs: name -> (DataType, min shape, max shape) (its one optimization profile);
    outputs: name -> (DataType, shape from {input name: shape});
    compute: {input name: float32 tensor} -> {output name: tensor} (cast to the output dtype);
    scratch: device_memory_size_v2 in bytes; stream_capturable: what is_stream_capturable answers (RTX).
    """

    inputs: dict[str, tuple[DataType, tuple, tuple]]
    outputs: dict[str, tuple[DataType, Callable[[dict], tuple]]]
    compute: Callable[[dict], dict]
    scratch: int = 4096
    stream_capturable: bool = True


@dataclass
class Enqueue:
    """One execute_async_v3 call: context, 'eager' | 'capture' | 'replay', stream handle, input shapes."""

    context: ContextDouble
    kind: str
    stream: int
    shapes: dict = field(default_factory=dict)


class RuntimeConfigDouble:
    """IRuntimeConfig (TensorRT-RTX): allocation strategy, kernel specialisation, built-in CUDA graphs."""

    def __init__(self):
        self.allocation = ExecutionContextAllocationStrategy.STATIC
        self.dynamic_shapes_kernel_specialization_strategy = DynamicShapesKernelSpecializationStrategy.LAZY
        self.cuda_graph_strategy = CudaGraphStrategy.DISABLED

    def set_execution_context_allocation_strategy(self, strategy) -> None:
        self.allocation = strategy


class EngineDouble:
    """ICudaEngine: I/O tensor queries, device_memory_size_v2, create_execution_context(strategy | config)."""

    def __init__(self, trt: TrtModule, cuda: FakeCuda, spec: EngineSpec):
        self.trt, self.cuda, self.spec = trt, cuda, spec
        self.names = list(spec.inputs) + list(spec.outputs)
        self.device_memory_size_v2 = spec.scratch
        self.contexts: list[ContextDouble] = []
        self.log: list[Enqueue] = []
        if trt.flavour == "tensorrt-rtx":
            self.create_runtime_config = RuntimeConfigDouble

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.spec.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return (self.spec.inputs.get(name) or self.spec.outputs[name])[0]

    def create_execution_context(self, strategy_or_config=ExecutionContextAllocationStrategy.STATIC):
        if isinstance(strategy_or_config, RuntimeConfigDouble):
            if self.trt.flavour != "tensorrt-rtx":
                raise TypeError("create_execution_context takes an allocation strategy here")
            config, strategy = strategy_or_config, strategy_or_config.allocation
        else:
            config, strategy = None, strategy_or_config
        context = ContextDouble(self, strategy, config)
        self.contexts.append(context)
        return context


class ContextDouble:
    """IExecutionContext with the rules of the module docstring."""

    def __init__(self, engine: EngineDouble, strategy, config: RuntimeConfigDouble | None):
        self.engine, self.strategy, self.config = engine, strategy, config
        self.specialization = None if config is None else config.dynamic_shapes_kernel_specialization_strategy
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.flushed_shapes: dict | None = None  # the shapes of the last enqueue outside capture
        self.graph: FakeGraph | None = None       # the graph that captured this context
        self.snapshot = None
        self.errors: list[str] = []
        if engine.trt.flavour == "tensorrt-rtx":  # TensorRT-RTX >= 1.2 only
            self.is_stream_capturable = self._is_stream_capturable

    # -- state ---------------------------------------------------------------------------------
    def set_device_memory(self, address: int, size: int) -> None:
        if self.strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            raise ContractError("set_device_memory on a context not created with USER_MANAGED memory")
        if address % ALIGNMENT or size < self.engine.device_memory_size_v2:
            raise ContractError(f"set_device_memory({address:#x}, {size}): needs 256-byte aligned memory of at "
                                f"least device_memory_size_v2 = {self.engine.device_memory_size_v2} bytes")
        self.memory = (address, size)

    def set_input_shape(self, name: str, shape) -> bool:
        spec = self.engine.spec.inputs.get(name)
        shape = tuple(int(d) for d in shape)
        if spec is None:
            return self._refuse(f"set_input_shape: '{name}' is not an input tensor")
        _, low, high = spec
        if len(shape) != len(low) or not all(lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return self._refuse(f"set_input_shape: {list(shape)} for '{name}' is outside the profile "
                                f"{list(low)}..{list(high)}")
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.names:
            return self._refuse(f"set_tensor_address: '{name}' is not an input or output tensor")
        if address % ALIGNMENT:
            return self._refuse(f"set_tensor_address: {address:#x} for '{name}' is not 256-byte aligned")
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        spec = self.engine.spec
        if name in spec.inputs:
            return self.shapes.get(name, (-1,) * len(spec.inputs[name][1]))
        if set(self.shapes) != set(spec.inputs):
            return (-1,)
        return tuple(spec.outputs[name][1](dict(self.shapes)))

    def _is_stream_capturable(self, stream: int) -> bool:
        return self.engine.spec.stream_capturable

    def _refuse(self, message: str) -> bool:
        self.errors.append(message)
        return False

    def _state(self):
        return dict(self.shapes), dict(self.addresses), self.memory

    # -- enqueue -------------------------------------------------------------------------------
    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = self.engine.cuda
        if stream_handle == 0:
            raise ContractError("execute_async_v3 on the legacy default stream (handle 0): TensorRT adds "
                                "device-wide synchronisations; enqueue on a stream of your own")
        stream = cuda.streams.get(stream_handle)
        if stream is None:
            return self._refuse(f"execute_async_v3: unknown stream {stream_handle}")
        missing = [n for n in self.engine.spec.inputs if n not in self.shapes]
        unbound = [n for n in self.engine.names if not self.addresses.get(n)]
        if missing or unbound or self.memory is None:
            return self._refuse(f"execute_async_v3: shapes missing for {missing}, addresses missing for {unbound}, "
                                f"device memory set: {self.memory is not None}")
        if stream.capturing is not None:
            return self._capture(stream)
        if cuda.replaying is not None:
            if self.graph is not cuda.replaying:
                raise ContractError("a graph replays a context it did not capture")
            if self._state() != self.snapshot:
                raise ContractError("replay of a graph whose context was re-bound or re-pointed since capture: "
                                    "the graph would use the capture-time state")
            self._run()
            self.engine.log.append(Enqueue(self, "replay", stream_handle, dict(self.shapes)))
            return True
        if self.graph is not None:
            raise ContractError("an eager enqueue on a context captured in a CUDA graph: eager calls need a "
                                "context of their own")
        self._run()
        self.flushed_shapes = dict(self.shapes)
        self.engine.log.append(Enqueue(self, "eager", stream_handle, dict(self.shapes)))
        return True

    def _capture(self, stream: FakeStream) -> bool:
        graph = stream.capturing
        if self.specialization == DynamicShapesKernelSpecializationStrategy.LAZY:
            raise ContractError("capturing a TensorRT-RTX context with LAZY kernel specialisation freezes its "
                                "fallback kernels into the graph: set EAGER in the runtime config")
        if self.graph is not None and self.graph is not graph:
            raise ContractError("a context captured in a second CUDA graph: one context per graph")
        if self.flushed_shapes != self.shapes:
            return self._refuse("enqueue captured before one enqueue at these shapes outside capture "
                                "(deferred shape updates cannot be captured)")
        if self.graph is None:
            self.graph, self.snapshot = graph, self._state()
            graph.contexts.append(self)
        elif self._state() != self.snapshot:
            raise ContractError("a context re-bound in the middle of its capture")
        self.engine.log.append(Enqueue(self, "capture", stream.cuda_stream, dict(self.shapes)))
        return True  # recorded, not run: a capture executes nothing

    def _run(self) -> None:
        spec = self.engine.spec
        feeds = {name: _memory(self.addresses[name], self.shapes[name], torch_dtype(trt_dtype(spec.inputs[name][0]))).float()
                 for name in spec.inputs}
        results = spec.compute(feeds)
        for name, (dtype, shape_of) in spec.outputs.items():
            target = _memory(self.addresses[name], tuple(shape_of(dict(self.shapes))), torch_dtype(trt_dtype(dtype)))
            target.copy_(results[name])


def _memory(address: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` / `dtype` at `address` (shares the memory: writes land there)."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    buffer = (ctypes.c_ubyte * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)
