"""TensorRT sessions (`tensorrt` 10.x, `tensorrt_rtx` 1.x), run as NVIDIA documents the execution API.

    session = TrtSession.from_plan(plan_path, record, backend, memory=pool)   # open_session does this
    outputs = session.run({"sample": latents, ...})          # eager: the session's own context
    binding = session.bind(feeds, in_place={"text_tokens"})  # a new context, bound once (CUDA graphs)
    outputs = binding.run(feeds)                             # copies feeds in, enqueues, same buffers

What each rule comes from (TensorRT / TensorRT-RTX API reference and developer guide):
- `set_input_shape`, `set_tensor_address`, `execute_async_v3` return False when TensorRT refuses
  (a name that is no I/O tensor, a shape outside the optimization profile, a failed enqueue): every
  result is checked and a refusal is a SessionError naming the tensor, the shape or address, and what
  to do. Engines here have one optimization profile (profile 0 is active by default), so
  `set_optimization_profile_async` is never called.
- setTensorAddress: "The pointer must have at least 256-byte alignment." Every address is checked
  before binding; inputs that are not aligned tensors of the engine's dtype (views at byte offsets
  such as `plan.timesteps[i]`, casts, host tensors) and every one-element input (the timestep, the
  ControlNet scale) are copied into the session's own aligned buffers (`runtime.streams.aligned_empty`),
  one small dedicated buffer per input.
- execute_async_v3 on the default stream "may lead to performance issues due to additional
  cudaDeviceSynchronize() calls ... Please use non-default stream": a call made while the legacy
  default stream is current enqueues on the session's own stream, which first waits for the caller's
  stream, and which the caller's stream waits for after (ordering is unchanged); a call made on any
  other stream (the denoising loop's own, a capture stream) enqueues on that stream.
- CUDA graphs (developer guide, "CUDA Graphs"): an enqueue may defer work after a shape change, so
  a context is enqueued once at its shape before it is captured; a graph captures its context's
  state, so every graph gets its own context (`bind`), bound once to fixed buffers and never touched
  again, while eager calls use the session's separate context. All contexts are created with
  ExecutionContextAllocationStrategy.USER_MANAGED and share one scratch buffer (`DeviceMemoryPool`,
  `set_device_memory`): they run one after another on one stream.
- TensorRT-RTX (IRuntimeConfig): dynamic-shape kernels are specialised EAGERLY (compiled, blocking,
  at the first enqueue of a shape, i.e. in the warm-up before capture) rather than LAZILY, which would
  freeze the generic fallback kernels into a captured graph; RTX's built-in CUDA graphs
  (cuda_graph_strategy) stay DISABLED because the runtime captures the whole loop itself;
  `is_stream_capturable(stream)` is asked before capture (`TrtBinding.capture_blocker`), and a context
  that says no makes the loop run eager, with the reason logged. Loop engines are built with
  REQUIRE_USER_ALLOCATION (engine/build.py), which RTX needs for stream capture.
Output buffers of eager calls are kept per input shapes, for the last OUTPUT_CACHE_SIZE shapes.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Collection, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.backend import detect_gpu
from engine.cache import EngineCheckError, build_dir_of, check_engine, rebuild_command
from engine.manifest import atomic_write
from engine.tensors import TensorSpec, torch_dtype, trt_dtype
from runtime.session_base import Session, SessionError, cuda_device
from runtime.streams import ALIGNMENT, TORCH_CUDA, aligned_copy, aligned_empty, is_aligned

OUTPUT_CACHE_SIZE = 4


class DeviceMemoryPool:
    """One scratch buffer for a pipeline's execution contexts (they run one after another on one stream),
    sized for the largest. Attach all before capturing: growing re-points every context and invalidates
    CUDA graphs captured earlier (`generation` counts reallocations; the loop keys its graphs by it)."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = cuda_device(device)
        self.buffer: torch.Tensor | None = None
        self.generation = 0
        self._contexts: list = []

    def attach(self, context, size: int) -> None:
        """Give `context` (created with USER_MANAGED memory) this pool; grow it to `size` bytes if needed."""
        self._contexts.append(context)
        if self.buffer is None or size > self.buffer.numel():
            self.buffer = aligned_empty((max(int(size), 1),), torch.uint8, self.device)  # 256-byte aligned
            self.generation += 1
            targets = self._contexts
        else:
            targets = [context]
        for each in targets:  # TensorRT >= 10.1 / TensorRT-RTX
            each.set_device_memory(self.buffer.data_ptr(), self.buffer.numel())

    def detach(self, context) -> None:
        """Forget `context` (its graph is gone): a later growth no longer re-points it."""
        self._contexts = [each for each in self._contexts if each is not context]


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@dataclass
class _Slot:
    """An eager call's buffers for one set of input shapes: outputs, and staging copies of inputs."""

    outputs: dict[str, torch.Tensor]
    staging: dict[str, torch.Tensor] = field(default_factory=dict)


class TrtSession(Session):
    """A deserialised TensorRT engine with torch buffers; `run` eager, `bind` for CUDA graphs.

    engine: an ICudaEngine; trt: its module (`tensorrt` / `tensorrt_rtx`); inputs / outputs: TensorSpec
    (names, shape ranges: the manifest's) whose dtypes are replaced by the plan's, as torch dtypes.
    memory: the DeviceMemoryPool shared with the pipeline's other sessions (None: one of its own).
    cuda: runtime.streams.TorchCuda (or a test double). cache_path: TensorRT-RTX runtime cache file
    (None: none). See the module docstring.
    """

    capturable = True

    def __init__(self, engine, trt, inputs, outputs, *, name: str = "engine", device: str | torch.device = "cuda",
                 memory: DeviceMemoryPool | None = None, cuda=TORCH_CUDA, cache_path: Path | None = None):
        self.name, self._engine, self._trt, self.cuda = name, engine, trt, cuda
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.device = cuda_device(device)
        self._check_io()
        self.memory = memory or DeviceMemoryPool(self.device)
        self.cache_path, self._runtime_cache = cache_path, None
        self._config = self._runtime_config()
        self._context = self.new_context()  # eager calls only; graphs get their own (`bind`)
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self._stream = None  # created on the first call made from the default stream

    @classmethod
    def from_plan(cls, plan_path: str | os.PathLike, record, backend, *, name: str | None = None,
                  device: str | torch.device = "cuda", memory: DeviceMemoryPool | None = None,
                  verify_sha256: bool = True, model: str | None = None) -> TrtSession:
        """A checked plan (record: its manifest EngineRecord; backend: engine.backend.Backend).

        verify_sha256: hash the whole plan against the manifest before loading (False: size only).
        Raises EngineCheckError (engine.cache) for a plan that cannot run here, SessionError without a GPU.
        """
        plan_path = Path(plan_path)
        name = name or plan_path.stem
        check_engine(record, plan_path, backend, detect_gpu(), verify_sha256=verify_sha256)
        if not torch.cuda.is_available():
            raise SessionError(f"{plan_path}: TensorRT engines run only on an NVIDIA GPU and torch sees none "
                               "(torch.cuda.is_available() is False); use backend='onnxruntime' on this machine")
        device = cuda_device(device)
        logger = backend.logger()
        runtime = backend.trt.Runtime(logger)
        with _on(device):
            engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            detail = logger.errors[-1] if logger.errors else "no error logged"
            rebuild = rebuild_command(build_dir_of(record, plan_path), name, backend.name, record=record, force=True)
            raise EngineCheckError(f"{plan_path}: {backend.name} {backend.version} could not deserialize the plan "
                                   f"({detail}). Rebuild it: {rebuild}")
        session = cls(engine, backend.trt, record.inputs, record.outputs, name=name, device=device, memory=memory,
                      cache_path=plan_path.with_suffix(".runtime_cache") if backend.caps.runtime_cache else None)
        session._runtime = runtime  # outlives the engine it deserialised
        return session

    # -- contexts ------------------------------------------------------------------------------
    def _runtime_config(self):
        """IRuntimeConfig where the module has one: USER_MANAGED memory; TensorRT-RTX: eager kernel
        specialisation, built-in CUDA graphs off, the JIT kernel cache of <plan>.runtime_cache."""
        trt = self._trt
        if not hasattr(self._engine, "create_runtime_config"):
            return None
        config = self._engine.create_runtime_config()
        if not hasattr(config, "set_execution_context_allocation_strategy"):
            return None
        config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        specialisation = getattr(trt, "DynamicShapesKernelSpecializationStrategy", None)
        if specialisation is not None and hasattr(config, "dynamic_shapes_kernel_specialization_strategy"):
            config.dynamic_shapes_kernel_specialization_strategy = specialisation.EAGER
        graphs = getattr(trt, "CudaGraphStrategy", None)
        if graphs is not None and hasattr(config, "cuda_graph_strategy"):
            config.cuda_graph_strategy = graphs.DISABLED
        if self.cache_path is not None and hasattr(config, "create_runtime_cache"):
            self._runtime_cache = config.create_runtime_cache()
            if self.cache_path.is_file() and not self._runtime_cache.deserialize(self.cache_path.read_bytes()):
                self._runtime_cache.reset()  # another GPU/driver/version wrote it: JIT-compile again
            config.set_runtime_cache(self._runtime_cache)
        return config

    def new_context(self):
        """A new IExecutionContext (USER_MANAGED) on the shared scratch pool."""
        with _on(self.device):
            if self._config is not None:
                context = self._engine.create_execution_context(self._config)
            else:
                context = self._engine.create_execution_context(
                    self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise SessionError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?): "
                               "free GPU memory or serve fewer pipelines per GPU")
        self.memory.attach(context, self._engine.device_memory_size_v2)
        return context

    def save_runtime_cache(self) -> None:
        """TensorRT-RTX: keep the kernels JIT-compiled so far for the next start (no-op elsewhere)."""
        if self._runtime_cache is not None:
            atomic_write(self.cache_path, bytes(self._runtime_cache.serialize()))

    def _check_io(self) -> None:
        """The plan's tensors must be the manifest's (names and modes); the plan's dtypes are the truth."""
        engine, trt = self._engine, self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        expected = set(self.input_names) | set(self.output_names)
        if set(names) != expected or set(inputs) != set(self.input_names):
            raise SessionError(f"{self.name}: the plan's tensors {sorted(names)} are not the manifest's "
                               f"{sorted(expected)}; rebuild the engine from the current ONNX")

        def typed(info: TensorSpec) -> TensorSpec:
            dtype = trt_dtype(engine.get_tensor_dtype(info.name))
            try:
                return replace(info, dtype=torch_dtype(dtype))
            except TypeError:
                raise SessionError(f"{self.name}: tensor '{info.name}' is {dtype} in the plan, which torch cannot "
                                   "hold; re-export the component with another I/O dtype") from None
        self.inputs, self.outputs = tuple(map(typed, self.inputs)), tuple(map(typed, self.outputs))

    # -- binding (every boolean checked) -------------------------------------------------------
    def _set_shape(self, context, info: TensorSpec, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(info.name, shape):
            raise SessionError(f"{self.name}: TensorRT refused shape {list(shape)} for input '{info.name}' "
                               f"(manifest range {info.min}..{info.max}): the plan's optimization profile "
                               "differs from its manifest; rebuild the engine (python -m export.build ... "
                               "--stage engines --force)")

    def _set_address(self, context, name: str, tensor: torch.Tensor) -> None:
        address = tensor.data_ptr()
        if address % ALIGNMENT:
            raise SessionError(f"{self.name}: tensor '{name}' {list(tensor.shape)} is at {address:#x}, not on a "
                               f"{ALIGNMENT}-byte boundary as TensorRT requires: copy it into an aligned buffer "
                               "(runtime.streams.aligned_copy) before binding")
        if not context.set_tensor_address(name, address):
            raise SessionError(f"{self.name}: TensorRT refused address {address:#x} for tensor '{name}' "
                               f"{list(tensor.shape)} {tensor.dtype}: pass a live, contiguous {self.device} "
                               "tensor of the engine's dtype (see the TensorRT log above)")

    def _output_shape(self, context, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise SessionError(f"{self.name}: output '{name}' has shape {list(shape)} after every input shape "
                               "was set (a data-dependent shape), which the runtime cannot preallocate; "
                               "re-export the model with static output shapes")
        return shape

    def _bindable(self, tensor: torch.Tensor, dtype: torch.dtype) -> bool:
        return (tensor.device == self.device and tensor.dtype == dtype and tensor.is_contiguous()
                and is_aligned(tensor))

    def _enqueue(self, context, shapes) -> None:
        """execute_async_v3 on the current stream, or on the session's own one from the default stream."""
        caller = self.cuda.current_stream(self.device)
        if self.cuda.is_default(caller):
            if self._stream is None:
                self._stream = self.cuda.new_stream(self.device)
            self._stream.wait_stream(caller)
            ok = context.execute_async_v3(self._stream.cuda_stream)
            caller.wait_stream(self._stream)
        else:
            ok = context.execute_async_v3(caller.cuda_stream)
        if not ok:
            raise SessionError(f"{self.name}: TensorRT enqueue failed for input shapes {[list(s) for s in shapes]} "
                               "(see the TensorRT log above); check that the engine was built for this GPU and "
                               "these shapes")

    # -- eager ---------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enqueue on the eager context; returns this shape's output buffers, which the next call with the
        same shapes overwrites (clone what you keep). Buffers of the last OUTPUT_CACHE_SIZE shapes are kept."""
        self.check_feeds(feeds)
        context = self._context
        shapes = tuple(tuple(feeds[info.name].shape) for info in self.inputs)
        for info, shape in zip(self.inputs, shapes):
            self._set_shape(context, info, shape)
        slot = self._slots.get(shapes)
        if slot is None:  # first call with these shapes: allocate (a warm-up does it before requests)
            slot = _Slot({o.name: aligned_empty(self._output_shape(context, o.name), o.dtype, self.device)
                          for o in self.outputs})
            self._slots[shapes] = slot
            while len(self._slots) > OUTPUT_CACHE_SIZE:
                self._slots.popitem(last=False)
        self._slots.move_to_end(shapes)
        for info in self.inputs:
            tensor = feeds[info.name]
            if tensor.numel() == 1 or not self._bindable(tensor, info.dtype):  # a scalar or a view: stage it
                stage = slot.staging.get(info.name)
                if stage is None:
                    stage = slot.staging[info.name] = aligned_empty(tensor.shape, info.dtype, self.device)
                stage.copy_(tensor)
                tensor = stage
            self._set_address(context, info.name, tensor)
        for name, buffer in slot.outputs.items():
            self._set_address(context, name, buffer)
        self._enqueue(context, shapes)
        return dict(slot.outputs)

    # -- graphs --------------------------------------------------------------------------------
    def bind(self, feeds: Mapping[str, torch.Tensor], in_place: Collection[str] = (),
             outputs: Mapping[str, torch.Tensor] | None = None) -> TrtBinding:
        """A new context bound once to fixed buffers at feeds' shapes (for one CUDA graph).

        in_place: inputs bound at the given tensors themselves (the caller's static buffers: aligned,
        contiguous, of the engine's dtype, else SessionError); every other input gets its own aligned
        buffer (a copy of the example). outputs: output buffers to share (another binding's, same shapes).
        """
        self.check_feeds(feeds)
        context = self.new_context()
        try:
            buffers = {}
            for info in self.inputs:
                tensor = feeds[info.name]
                if info.name in in_place:
                    if not self._bindable(tensor, info.dtype):
                        raise SessionError(f"{self.name}: '{info.name}' cannot be bound in place ({tensor.dtype} on "
                                           f"{tensor.device}, aligned: {is_aligned(tensor)}); it needs a contiguous "
                                           f"256-byte aligned {info.dtype} tensor on {self.device}")
                else:
                    tensor = aligned_copy(tensor, info.dtype, self.device)
                buffers[info.name] = tensor
                self._set_shape(context, info, tuple(tensor.shape))
            produced = {}
            for info in self.outputs:
                shape, given = self._output_shape(context, info.name), (outputs or {}).get(info.name)
                usable = given is not None and tuple(given.shape) == shape and self._bindable(given, info.dtype)
                produced[info.name] = given if usable else aligned_empty(shape, info.dtype, self.device)
            for name, tensor in {**buffers, **produced}.items():
                self._set_address(context, name, tensor)
        except BaseException:
            self.memory.detach(context)
            raise
        return TrtBinding(self, context, buffers, produced)


class TrtBinding:
    """One execution context of a TrtSession, bound once to fixed buffers (`TrtSession.bind`).

    input_buffers / output_buffers: name -> the 256-byte aligned tensors TensorRT reads / writes.
    `run(feeds)` copies each feed into its buffer (none for a feed that is that buffer) and enqueues on the
    current stream; it returns output_buffers. Capture it only after one run (`capture_blocker`).
    """

    def __init__(self, session: TrtSession, context, input_buffers: dict, output_buffers: dict):
        self.session, self.context = session, context
        self.input_buffers, self.output_buffers = input_buffers, output_buffers
        self.name, self.enqueued = session.name, False

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feeds: every input at its bound shape -> the output buffers (overwritten by the next run)."""
        self.session.check_feeds(feeds)
        for name, buffer in self.input_buffers.items():
            value = feeds[name]
            if tuple(value.shape) != tuple(buffer.shape):
                raise SessionError(f"{self.name}: this context is bound for '{name}' {list(buffer.shape)}, got "
                                   f"{list(value.shape)}: bind a new one for other shapes")
            if value.data_ptr() != buffer.data_ptr() or value.dtype != buffer.dtype:
                buffer.copy_(value)
        self.session._enqueue(self.context, [tuple(b.shape) for b in self.input_buffers.values()])
        self.enqueued = True
        return dict(self.output_buffers)

    def capture_blocker(self, stream) -> str | None:
        """Why this context must not be captured on `stream` now (None: it may be)."""
        if not self.enqueued:
            return (f"{self.name}: a context is captured only after one enqueue at its shapes (TensorRT defers "
                    "updates after a shape change to the next enqueue)")
        capturable = getattr(self.context, "is_stream_capturable", None)  # TensorRT-RTX >= 1.2
        if capturable is not None and not capturable(stream.cuda_stream):
            return (f"{self.name}: TensorRT-RTX reports that this context cannot be stream-captured "
                    "(is_stream_capturable is False: data-dependent shapes, on-device control flow, or a plan "
                    "built without REQUIRE_USER_ALLOCATION)")
        return None

    def release(self) -> None:
        """Its graph is gone: the scratch pool stops tracking the context."""
        self.session.memory.detach(self.context)

