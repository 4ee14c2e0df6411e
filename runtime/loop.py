"""The denoising loop over sessions: eager, one CUDA graph for the whole loop, or one graph per step.

One step, as the baseline (benchmarks/baseline.py `SDXLBase.denoise`) computes it:

    model_in  = scale_model_input(cat([latents, latents]))          # CFG rows [negative, positive]
    residuals = controlnet(model_in, t, face_tokens, control_image, text_embeds, time_ids, scale)
    noise     = unet(model_in, t, text_tokens, ip_tokens, ip_scale, text_embeds, time_ids, residuals)
    noise     = uncond + guidance * (cond - uncond)
    latents   = scheduler step(latents, noise, pre-drawn noise of step i)

Tensors: latents (B, 4, h, w) float32 (h, w = H/8, W/8); rows R = 2B with CFG (guidance > 1), else B.
Every per-request value (conditioning, λ per layer, ControlNet scale, guidance, the initial and
per-step noise) is a tensor in `LoopInputs`, so a captured graph replays with new values copied
into its static buffers; shapes, step count, scheduler and CFG on/off key the graph.

`DenoiseLoop(unet, controlnet, device).run(plan, inputs)` picks the path: with capturable sessions
(TensorRT) on CUDA, the whole loop is captured once per key and replayed; if capture fails it falls
back to per-step graphs, then eager. ONNX Runtime sessions always run eager.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from runtime.schedulers import SchedulePlan, new_state, scale_model_input, step
from runtime.sessions import Session

log = logging.getLogger("runtime.loop")
GRAPH_CACHE_SIZE = 4
StopCheck = Callable[[], bool]


class DenoiseCancelled(RuntimeError):
    """`should_stop()` returned True: the loop stopped (the message says at which step); no latents."""


def _check_stop(should_stop: StopCheck | None, i: int, num_steps: int) -> None:
    """DenoiseCancelled when should_stop() is True before step i (0-based) of num_steps."""
    if should_stop is not None and should_stop():
        raise DenoiseCancelled(f"denoising cancelled before step {i + 1} of {num_steps} "
                               f"({i} done): nobody waits for these latents")


@dataclass
class LoopInputs:
    """Per-request tensors of the loop, on the loop's device.

    latents: (B, 4, h, w) float32 initial latents (already x init_noise_sigma).
    step_noise: (N, B, 4, h, w) float32 noise per step (`draw_noise`), or None.
    guidance: 0-d float32; CFG is on when the rows of unet_feeds are 2B.
    unet_feeds: text_tokens (R, 77, C), ip_tokens (R, K, C), ip_scale (L,) float32, text_embeds (R, P),
        time_ids (R, 6); without a ControlNet also the zero residuals.
    controlnet_feeds: face_tokens (R, K, C), control_image (R, 3, H, W), text_embeds, time_ids,
        conditioning_scale (1,) float32; None without a ControlNet.
    """

    latents: torch.Tensor
    step_noise: torch.Tensor | None
    guidance: torch.Tensor
    unet_feeds: dict[str, torch.Tensor]
    controlnet_feeds: dict[str, torch.Tensor] | None = None

    @property
    def cfg(self) -> bool:
        return self.unet_feeds["text_tokens"].shape[0] == 2 * self.latents.shape[0]

    def key(self) -> tuple:
        """Everything a captured graph depends on besides values: shapes and dtypes."""
        def describe(feeds):
            return None if feeds is None else tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in feeds.items()))
        noise = None if self.step_noise is None else tuple(self.step_noise.shape)
        return (tuple(self.latents.shape), noise, describe(self.unet_feeds), describe(self.controlnet_feeds))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(path, tensor) for every tensor, in a fixed order (for copying into static buffers)."""
        out = [("latents", self.latents), ("guidance", self.guidance)]
        if self.step_noise is not None:
            out.append(("step_noise", self.step_noise))
        for group in ("unet_feeds", "controlnet_feeds"):
            feeds = getattr(self, group) or {}
            out.extend((f"{group}.{name}", feeds[name]) for name in sorted(feeds))
        return out


def clone_inputs(inputs: LoopInputs) -> LoopInputs:
    """A deep copy (the static buffers of a graph)."""
    copy = {f.name: getattr(inputs, f.name) for f in fields(inputs)}
    for name, value in copy.items():
        if isinstance(value, torch.Tensor):
            copy[name] = value.clone()
        elif isinstance(value, dict):
            copy[name] = {k: v.clone() for k, v in value.items()}
    return replace(inputs, **copy)


def denoise_step(unet: Session, controlnet: Session | None, plan: SchedulePlan, i: int, latents: torch.Tensor,
                 inputs: LoopInputs, state) -> torch.Tensor:
    """Latents (B, 4, h, w) after step i (a Python int); only device work, no host reads."""
    model_in = torch.cat([latents, latents]) if inputs.cfg else latents
    model_in = scale_model_input(plan, i, model_in)
    timestep = plan.timesteps[i].reshape(1)
    feeds = {"sample": model_in, "timestep": timestep, **inputs.unet_feeds}
    if controlnet is not None:
        feeds.update(controlnet.run({"sample": model_in, "timestep": timestep, **inputs.controlnet_feeds}))
    noise = unet.run(feeds)["noise_pred"]
    if inputs.cfg:
        uncond, cond = noise.chunk(2)
        noise = uncond + inputs.guidance.to(noise.dtype) * (cond - uncond)
    step_noise = None if inputs.step_noise is None else inputs.step_noise[i]
    return step(plan, i, latents, noise, state, step_noise)


def denoise_eager(unet: Session, controlnet: Session | None, plan: SchedulePlan, inputs: LoopInputs,
                  state=None, should_stop: StopCheck | None = None) -> torch.Tensor:
    """The whole loop, step by step. Returns the final latents (B, 4, h, w) float32.

    should_stop: checked before every step; True raises DenoiseCancelled (never inside a capture).
    """
    state = state or new_state(plan, inputs.latents)
    latents = inputs.latents
    for i in range(plan.num_steps):
        _check_stop(should_stop, i, plan.num_steps)
        latents = denoise_step(unet, controlnet, plan, i, latents, inputs, state)
    return latents


class _WholeLoopGraph:
    """The loop captured as ONE CUDA graph over static buffers; `__call__` copies inputs in and replays."""

    def __init__(self, unet, controlnet, plan, inputs: LoopInputs):
        self.plan = plan  # the graph reads its coefficient tensors: keep them alive
        self.static = clone_inputs(inputs)
        self.state = new_state(plan, self.static.latents)
        side = torch.cuda.Stream(self.static.latents.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: TensorRT needs one enqueue per shape before capture
            denoise_eager(unet, controlnet, plan, self.static, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = denoise_eager(unet, controlnet, plan, self.static, self.state)

    def __call__(self, inputs: LoopInputs, should_stop: StopCheck | None = None) -> torch.Tensor:
        _check_stop(should_stop, 0, self.plan.num_steps)  # one launch: the only point to stop at
        _copy_into(self.static, inputs)
        if self.state.prev_x0 is not None:
            self.state.prev_x0.zero_()
        self.graph.replay()
        return self.output.clone()


class _StepGraphs:
    """One CUDA graph per step (fallback when the whole loop cannot be captured)."""

    def __init__(self, unet, controlnet, plan, inputs: LoopInputs):
        self.plan = plan
        self.static = clone_inputs(inputs)
        self.state = new_state(plan, self.static.latents)
        self.current = self.static.latents  # step i reads `current`, writes its output buffer
        side = torch.cuda.Stream(self.current.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            denoise_step(unet, controlnet, plan, 0, self.current, self.static, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.outputs = [], []
        source, pool = self.current, torch.cuda.graph_pool_handle()  # one pool: replayed in capture order
        for i in range(plan.num_steps):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = denoise_step(unet, controlnet, plan, i, source, self.static, self.state)
            self.graphs.append(graph)
            self.outputs.append(out)
            source = out

    def __call__(self, inputs: LoopInputs, should_stop: StopCheck | None = None) -> torch.Tensor:
        _copy_into(self.static, inputs)
        if self.state.prev_x0 is not None:
            self.state.prev_x0.zero_()
        for i, graph in enumerate(self.graphs):
            _check_stop(should_stop, i, len(self.graphs))
            graph.replay()
        return self.outputs[-1].clone()


def _copy_into(static: LoopInputs, inputs: LoopInputs) -> None:
    for (name, target), (_, value) in zip(static.tensors(), inputs.tensors()):
        target.copy_(value, non_blocking=True)


class DenoiseLoop:
    """Runs the loop over a UNet (and optional ControlNet) session, graph-captured where possible.

    mode: 'auto' (graph on CUDA with capturable sessions, else eager), 'graph', 'step-graphs', 'eager'.
    Graphs are cached per (plan name, steps, shapes) key, at most GRAPH_CACHE_SIZE of them.
    """

    def __init__(self, unet: Session, controlnet: Session | None = None, mode: str = "auto"):
        if mode not in ("auto", "graph", "step-graphs", "eager"):
            raise ValueError(f"mode must be 'auto', 'graph', 'step-graphs' or 'eager', got {mode!r}")
        self.unet, self.controlnet, self.mode = unet, controlnet, mode
        self._graphs: OrderedDict = OrderedDict()
        self.last_path = None  # which path the last run took: 'graph', 'step-graphs' or 'eager'

    @property
    def can_capture(self) -> bool:
        sessions = [s for s in (self.unet, self.controlnet) if s is not None]
        return all(s.capturable and s.device.type == "cuda" for s in sessions) and torch.cuda.is_available()

    def run(self, plan: SchedulePlan, inputs: LoopInputs, should_stop: Callable[[], bool] | None = None
            ) -> torch.Tensor:
        """Final latents (B, 4, h, w) float32 for one request.

        should_stop: eager and per-step graphs call it before every step, the whole-loop graph before its
        launch; once it returns True the run raises DenoiseCancelled (saying at which step).
        """
        mode = self.mode
        if mode == "auto":
            mode = "graph" if self.can_capture else "eager"
        if mode != "eager" and not self.can_capture:
            raise RuntimeError("CUDA graphs need TensorRT (or torch) sessions on a CUDA device; use mode='eager'")
        if mode == "eager":
            self.last_path = "eager"
            return denoise_eager(self.unet, self.controlnet, plan, inputs, should_stop=should_stop)
        key = (plan.name, plan.num_steps, plan.timesteps_host, inputs.key(), _pool_generation(self.unet),
               _pool_generation(self.controlnet))
        runner = self._graphs.get(key)
        if runner is None:
            runner = self._capture(plan, inputs, mode)
            self._graphs[key] = runner
            while len(self._graphs) > GRAPH_CACHE_SIZE:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        if runner == "eager":
            self.last_path = "eager"
            return denoise_eager(self.unet, self.controlnet, plan, inputs, should_stop=should_stop)
        self.last_path = "graph" if isinstance(runner, _WholeLoopGraph) else "step-graphs"
        return runner(inputs, should_stop)

    def _capture(self, plan, inputs, mode):
        order = [_WholeLoopGraph, _StepGraphs] if mode == "graph" else [_StepGraphs]
        for kind in order:
            try:
                return kind(self.unet, self.controlnet, plan, inputs)
            except Exception as error:  # capture failures: fall back, say why once
                torch.cuda.synchronize()
                log.warning("CUDA graph capture (%s) failed, falling back: %s", kind.__name__, error)
        return "eager"


def _pool_generation(session) -> int:
    memory = getattr(session, "memory", None)
    return getattr(memory, "generation", 0)
