"""The Session interface every backend implements (runtime/sessions.py lists them), and its feed checks.

A session's `inputs` / `outputs` are engine.tensors.TensorSpec with torch dtypes (what it feeds to /
gets from its engine), dims with axis names, and the shape range where the manifest records one.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from engine.tensors import TensorSpec
from runtime.streams import TORCH_CUDA


class SessionError(RuntimeError):
    """A session cannot be opened or was fed the wrong tensors; the message says what to do."""


class ShapeRangeError(SessionError, ValueError):
    """An input shape is outside the range the engine was built for."""


class Session:
    """Base of every session: metadata and the feed checks; subclasses implement `run`.

    device: where `run` returns its outputs. capturable: `run` only enqueues on the current CUDA stream,
    so a loop of calls can be captured in a CUDA graph. cuda: runtime.streams.TorchCuda (or a test double).
    """

    name: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
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

    def input(self, name: str) -> TensorSpec:
        """The TensorSpec of input `name`; SessionError listing the inputs if there is none."""
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


def check_shape(component: str, info: TensorSpec, shape: tuple[int, ...]) -> None:
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


def cuda_device(device: str | torch.device = "cuda") -> torch.device:
    """torch.device with its index ('cuda' -> 'cuda:<current>'), so device comparisons are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
