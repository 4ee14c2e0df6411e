"""CUDA streams, graphs and aligned buffers, as the TensorRT sessions and the denoising loop use them.

`TorchCuda` is the production implementation (torch.cuda). Sessions and the loop take it as a
parameter (`cuda=`), so the same binding, enqueue and capture code runs against a test double of
the CUDA side on a machine without a GPU (tests/trt_double.py `FakeCuda`): what goes through this
seam is exactly what the code asks of CUDA, nothing more.

    cuda = TorchCuda()
    stream = cuda.new_stream(device)                  # a stream this process owns (never handle 0)
    with cuda.fork(stream, device):                   # stream waits for the caller's, caller joins after
        graph = cuda.new_graph()
        out = cuda.capture(graph, stream, body)       # body() captured on `stream`; returns its result
    graph.replay()

`aligned_empty` allocates tensors whose data_ptr() is a multiple of 256 bytes (TensorRT's rule for
every I/O address), whatever the allocator's own alignment (CUDA's caching allocator: 512; the CPU
allocator: 64).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

ALIGNMENT = 256  # bytes: IExecutionContext::setTensorAddress "The pointer must have at least 256-byte alignment"


def aligned_empty(shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` / `dtype` on `device` whose data_ptr() % 256 == 0."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def aligned_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """A 256-byte aligned contiguous copy of `tensor` (cast to dtype, moved to device when given)."""
    out = aligned_empty(tensor.shape, dtype or tensor.dtype, device if device is not None else tensor.device)
    out.copy_(tensor)
    return out


def is_aligned(tensor: torch.Tensor) -> bool:
    """True when tensor's first byte sits on a 256-byte boundary."""
    return tensor.data_ptr() % ALIGNMENT == 0


class TorchCuda:
    """torch.cuda behind the few calls the runtime makes (see the module docstring)."""

    def available(self, device: torch.device) -> bool:
        """Streams and graphs can be used for tensors on `device`."""
        return device.type == "cuda" and torch.cuda.is_available()

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def is_default(self, stream) -> bool:
        """The legacy default stream (handle 0), on which TensorRT's enqueue adds device-wide syncs."""
        return stream.cuda_stream == 0

    def use(self, stream):
        """Context manager: `stream` is the current stream inside."""
        return torch.cuda.stream(stream)

    @contextmanager
    def fork(self, stream, device: torch.device) -> Iterator:
        """Run the block on `stream` after the caller's pending work; the caller's stream waits for it after."""
        caller = self.current_stream(device)
        stream.wait_stream(caller)
        try:
            with self.use(stream):
                yield stream
        finally:
            caller.wait_stream(stream)

    def keep_alive(self, tensor: torch.Tensor, stream) -> None:
        """Tell the caching allocator that `tensor` (allocated on another stream) is used on `stream`."""
        tensor.record_stream(stream)

    def new_graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def graph_pool(self):
        """A memory pool handle several graphs share (they replay one after another)."""
        return torch.cuda.graph_pool_handle()

    def capture(self, graph, stream, body: Callable[[], object], pool=None):
        """Capture body() into `graph` on `stream` (thread-local capture mode); returns body's result, whose
        tensors the graph writes on every replay."""
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            return body()

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


TORCH_CUDA = TorchCuda()
