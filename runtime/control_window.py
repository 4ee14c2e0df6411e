"""The ControlNet step window of the denoising loop (runtime/loop.py): diffusers' control_guidance_start /
control_guidance_end as a per-step mask (`control_window`, `LoopInputs.controlnet_steps`), and the zero
residuals the UNet reads on the steps off the window, where the ControlNet is not run.
"""
from __future__ import annotations

import torch

from engine.profiles import LATENT_FACTOR, parse_dim
from runtime.session_base import Session

__all__ = ["control_window", "zero_residuals", "off_window_residuals", "ResidualBuffers"]


def control_window(num_steps: int, start: float = 0.0, end: float = 1.0) -> tuple[bool, ...] | None:
    """Which of num_steps steps run the ControlNet, as diffusers' StableDiffusionXLControlNetPipeline keeps
    it (controlnet_keep[i] = 1 - float(i / N < start or (i + 1) / N > end)); None when every step does."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"the ControlNet window needs 0 <= control_guidance_start < control_guidance_end <= 1, "
                         f"got {start}..{end}")
    steps = tuple(not (i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps))
    return None if all(steps) else steps


def zero_residuals(unet: Session, rows: int, latent_height: int, latent_width: int) -> dict[str, torch.Tensor]:
    """Zero ControlNet residuals (rows, C, h/2^k, w/2^k) float32 at the shapes the UNet's residual inputs
    name (engine/profiles.py axes, e.g. 'latent_height/2'): a UNet without a ControlNet, or off its window."""
    pixels = {"height": latent_height * LATENT_FACTOR, "width": latent_width * LATENT_FACTOR}

    def size(dim) -> int:
        return dim if isinstance(dim, int) else parse_dim(dim).value(pixels[parse_dim(dim).base], dim)

    device = getattr(unet, "device", "cpu")
    return {info.name: torch.zeros((rows, *map(size, info.shape[1:])), device=device)
            for info in unet.inputs if info.name.startswith(("down_residual_", "mid_residual"))}


def off_window_residuals(unet: Session, controlnet, inputs, i: int,
                         model_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step i is off the ControlNet's window: in a graph, the ControlNet's bound output buffers (which the
    UNet's residual inputs are bound at), zeroed as the loop leaves the window; eager, new zeros."""
    buffers = getattr(controlnet, "output_buffers", None)
    if not buffers:
        return zero_residuals(unet, model_in.shape[0], *model_in.shape[2:])
    if i == 0 or inputs.runs_controlnet(i - 1):
        for buffer in buffers.values():
            buffer.zero_()
    return dict(buffers)


class ResidualBuffers:
    """An off-window step's stand-in for its bound ControlNet (per-step graphs): the output buffers the
    UNet's residual inputs are bound at (shared by the steps), without the context, which never runs."""

    def __init__(self, bound):
        self.output_buffers = getattr(bound, "output_buffers", None)
        getattr(bound, "release", lambda: None)()
