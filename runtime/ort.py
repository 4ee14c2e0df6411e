"""ONNX Runtime sessions on torch tensors, through I/O binding: no host round trip per call.

    session = OrtSession("build/tiny/onnx/unet_instantid.onnx")   # open_session does this from a build
    outputs = session.run({"sample": latents, ...})                 # dict[str, torch.Tensor] both ways

How a call moves its tensors (`run`):
- Inputs: each feed is cast to the graph's dtype and moved to the execution provider's device by torch
  (nothing happens when it already is a contiguous tensor of that dtype there: the usual case); ORT
  then reads it where it lies, `IOBinding.bind_input(name, device type, device index, ONNX element
  type, shape, data_ptr)`.
- Outputs: bound to the provider's device (`bind_output(name, device type, device index)`); ORT
  allocates them at the shapes the run produces, and torch takes them over through DLPack, without a
  copy (the tensor keeps ORT's buffer alive). They move to `device` only when it is another one.
- CUDA (onnxruntime-gpu's CUDAExecutionProvider): ORT runs on a stream of its own, not torch's current
  stream (it would take one only as `user_compute_stream`, fixed when the session is created, while the
  runtime switches streams). So a call first waits for the device (`TorchCuda.synchronize`: every torch
  kernel producing a feed has finished), and `run_with_iobinding` returns after ORT synchronised its
  stream (`synchronize_outputs` makes that explicit): the outputs are complete when torch sees them.
  This also makes reuse safe: an output's buffer returns to ORT's arena when its tensor dies, and the
  next call writes into the arena only after the device is idle.
ONNX Runtime sessions are not capturable in CUDA graphs (the loop runs them eager).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from engine.tensors import TensorSpec, onnx_enum, ort_dtype, torch_dtype
from runtime.session_base import Session, SessionError, cuda_device


class OrtSession(Session):
    """An ONNX graph in ONNX Runtime; inputs cast to the graph's dtypes (fp16 graphs take fp32 tensors),
    outputs in the graph's dtypes on `device`.

    providers: default the CUDA execution provider on `device` (or torch's current GPU) when onnxruntime-gpu
    and a GPU are present, else CPU. device: where outputs go (default: the provider's device).
    threads: intra-op threads (None: ONNX Runtime's default).
    """

    def __init__(self, onnx_path: str | os.PathLike, name: str | None = None, providers: Sequence | None = None,
                 device: str | torch.device | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise SessionError('ONNX Runtime is not installed: pip install "instantrt[cpu]" (or "instantrt[gpu]" '
                               "for its CUDA build, never both), or run with --backend torch or tensorrt") from None

        path = Path(onnx_path)
        if not path.is_file():
            raise SessionError(f"{path} not found: export it first (python -m export.build --stage onnx --out "
                               f"{path.parent.parent})")
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
                gpu = cuda_device(device if device is not None and torch.device(device).type == "cuda" else "cuda")
                providers = [("CUDAExecutionProvider", {"device_id": gpu.index}), "CPUExecutionProvider"]
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
        self.ort_device = _provider_device(self._session)
        self.device = cuda_device(device) if device is not None else self.ort_device
        self.inputs = tuple(_spec(value) for value in self._session.get_inputs())
        self.outputs = tuple(_spec(value) for value in self._session.get_outputs())

    def io_binding(self, feeds: Mapping[str, torch.Tensor]):
        """(IOBinding, bound inputs): every input bound at the memory of its tensor on `ort_device` (the feed
        itself when it is a contiguous tensor of the graph's dtype there, else torch's converted copy),
        every output bound to `ort_device` for ORT to allocate. Keep the bound inputs alive until the run
        has returned; ORT reads them when it runs, not when they are bound."""
        binding = self._session.io_binding()
        device_id = self.ort_device.index or 0
        bound = {}
        for info in self.inputs:
            tensor = torch.as_tensor(feeds[info.name]).detach().to(self.ort_device, info.dtype).contiguous()
            binding.bind_input(info.name, self.ort_device.type, device_id, onnx_enum(info.dtype),
                               list(tensor.shape), tensor.data_ptr())
            bound[info.name] = tensor
        for info in self.outputs:
            binding.bind_output(info.name, self.ort_device.type, device_id)
        return binding, bound

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feeds bound in place, outputs taken over from ORT (see the module docstring); outputs on `device`."""
        self.check_feeds(feeds)
        binding, bound = self.io_binding(feeds)
        return self.run_bound(binding)  # `bound` lives until ORT has read it

    def run_bound(self, binding) -> dict[str, torch.Tensor]:
        """Run an `io_binding` (its inputs still alive): output name -> the tensor ORT wrote, on `device`."""
        if self.ort_device.type == "cuda":  # ORT's stream must not read feeds torch is still writing
            self.cuda.synchronize(self.ort_device)
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs_as_ortvaluevector()
        return {info.name: torch.from_dlpack(values[index].to_dlpack()).to(self.device)
                for index, info in enumerate(self.outputs)}


def _provider_device(session) -> torch.device:
    """The device ONNX Runtime computes on: cuda:<device_id> under the CUDA execution provider, else cpu."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return torch.device("cpu")
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return torch.device("cuda", int(options.get("device_id", 0)))


def _spec(value) -> TensorSpec:
    """An ONNX Runtime NodeArg as a TensorSpec with a torch dtype (unnamed dynamic dims: None)."""
    try:
        dtype = torch_dtype(ort_dtype(value.type))
    except TypeError as error:
        raise SessionError(f"input/output '{value.name}' has type {value.type}, which the runtime does not feed "
                           f"({error})") from None
    return TensorSpec(value.name, dtype, tuple(dim if isinstance(dim, int) else (dim or None) for dim in value.shape))
