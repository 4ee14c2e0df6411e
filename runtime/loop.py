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
into its static buffers; shapes, step count, scheduler, CFG on/off and the ControlNet's step window
key the graph.

The ControlNet step window (diffusers' control_guidance_start / _end, `control_window`): on the steps
`LoopInputs.controlnet_steps` marks False the ControlNet session (every ControlNet it sums) is not run
at all and the UNet gets zero residuals, as diffusers' conditioning scale 0 gives; in a graph those are
the ControlNet's bound output buffers (the UNet's residual inputs), zeroed when the loop leaves the
window. A window without any step drops the ControlNet from the call.

`DenoiseLoop(unet, controlnet, mode).run(plan, inputs, should_stop)` picks the path: with capturable
sessions (TensorRT, torch on CUDA), the whole loop is captured once per key and replayed; if capture
fails it falls back to per-step graphs, then eager. ONNX Runtime sessions always run eager.
`warm_up(plan, inputs)` prepares (captures) that path before the first request.

On CUDA everything runs on the loop's own stream (it waits for the caller's stream and the caller's
waits for it), never on the legacy default stream. A graph never calls a session's eager context:
it calls `session.bind(...)`, which for TensorRT is an execution context of its own, bound once to
fixed buffers (the graph's static conditioning in place, the ControlNet's residual outputs as the
UNet's residual inputs, a dedicated aligned buffer for the timestep and the sample), enqueued once
outside the capture (the warm-up pass) and then captured; `capture_blocker` (TensorRT-RTX's
is_stream_capturable) can refuse, and the loop then runs eager, saying why (runtime/trt.py).
The CUDA calls go through `cuda` (runtime.streams.TorchCuda; the sessions' own), a seam that lets
tests run this code against a TensorRT/CUDA test double on the CPU.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from runtime.control_window import ResidualBuffers, off_window_residuals, zero_residuals
from runtime.schedulers import SchedulePlan, new_state, scale_model_input, step
from runtime.sessions import Session
from runtime.streams import TORCH_CUDA, aligned_copy

log = logging.getLogger("runtime.loop")
GRAPH_CACHE_SIZE = 4
StopCheck = Callable[[], bool]
Progress = Callable[[int, int], None]  # (steps done, steps in all), called as steps finish


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
    unet_feeds: text_tokens (R, T, C) (T = 77·k prompt tokens), ip_tokens (R, K, C), ip_scale (L,) float32, text_embeds (R, P),
        time_ids (R, 6) (SDXL only: `unet_conditioning`); without a ControlNet also the zero residuals.
    controlnet_feeds: face_tokens (R, K, C), control_image (R, 3, H, W), text_embeds, time_ids,
        conditioning_scale (1,) float32; None without a ControlNet.
    controlnet_steps: per step, whether the ControlNet runs (`control_window`); None: every step.
    """

    latents: torch.Tensor
    step_noise: torch.Tensor | None
    guidance: torch.Tensor
    unet_feeds: dict[str, torch.Tensor]
    controlnet_feeds: dict[str, torch.Tensor] | None = None
    controlnet_steps: tuple[bool, ...] | None = None

    @property
    def cfg(self) -> bool:
        return self.unet_feeds["text_tokens"].shape[0] == 2 * self.latents.shape[0]

    def runs_controlnet(self, i: int) -> bool:
        """Whether step i runs the ControlNet (inside the window)."""
        return self.controlnet_steps is None or self.controlnet_steps[i]

    def key(self) -> tuple:
        """Everything a captured graph depends on besides values: shapes, dtypes and the ControlNet's steps."""
        def describe(feeds):
            return None if feeds is None else tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in feeds.items()))
        noise = None if self.step_noise is None else tuple(self.step_noise.shape)
        return (tuple(self.latents.shape), noise, describe(self.unet_feeds), describe(self.controlnet_feeds),
                self.controlnet_steps)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(path, tensor) for every tensor, in a fixed order (for copying into static buffers)."""
        out = [("latents", self.latents), ("guidance", self.guidance)]
        if self.step_noise is not None:
            out.append(("step_noise", self.step_noise))
        for group in ("unet_feeds", "controlnet_feeds"):
            feeds = getattr(self, group) or {}
            out.extend((f"{group}.{name}", feeds[name]) for name in sorted(feeds))
        return out


def unet_conditioning(unet: Session, text_tokens: torch.Tensor, ip_tokens: torch.Tensor, ip_scale: torch.Tensor,
                      text_embeds: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """The UNet's per-request feeds: text_tokens (R, T, C) (T = 77·k), ip_tokens (R, K, C), ip_scale (L,) float32, and
    where the UNet takes SDXL's added conditioning, text_embeds (R, P) and time_ids (R, 6) float32 = the
    baseline's (H, W, 0, 0, H, W) for an H x W px output. An SD1.5 UNet has neither (its pooled rows are (R, 0))."""
    feeds = {"text_tokens": text_tokens, "ip_tokens": ip_tokens, "ip_scale": ip_scale}
    if "time_ids" in unet.input_names:
        feeds["text_embeds"] = text_embeds
        feeds["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32,
                                         device=text_tokens.device).repeat(text_tokens.shape[0], 1)
    return feeds


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
    if controlnet is not None and inputs.runs_controlnet(i):
        feeds.update(controlnet.run({"sample": model_in, "timestep": timestep, **inputs.controlnet_feeds}))
    elif controlnet is not None:  # off the window: zero residuals, the ControlNet is not run
        feeds.update(off_window_residuals(unet, controlnet, inputs, i, model_in))
    noise = unet.run(feeds)["noise_pred"]
    if inputs.cfg:
        uncond, cond = noise.chunk(2)
        noise = uncond + inputs.guidance.to(noise.dtype) * (cond - uncond)
    step_noise = None if inputs.step_noise is None else inputs.step_noise[i]
    return step(plan, i, latents, noise, state, step_noise)


def denoise_eager(unet: Session, controlnet: Session | None, plan: SchedulePlan, inputs: LoopInputs,
                  state=None, should_stop: StopCheck | None = None, progress: Progress | None = None
                  ) -> torch.Tensor:
    """The whole loop, step by step. Returns the final latents (B, 4, h, w) float32.

    should_stop: checked before every step; True raises DenoiseCancelled (never inside a capture).
    progress: called with (i + 1, num_steps) after step i is enqueued (never inside a capture).
    """
    state = state or new_state(plan, inputs.latents)
    latents = inputs.latents
    for i in range(plan.num_steps):
        _check_stop(should_stop, i, plan.num_steps)
        latents = denoise_step(unet, controlnet, plan, i, latents, inputs, state)
        if progress is not None:
            progress(i + 1, plan.num_steps)
    return latents


class CaptureRefused(RuntimeError):
    """A session says its context cannot be captured on this stream; the loop runs eager instead."""


def static_inputs(inputs: LoopInputs, unet: Session, controlnet: Session | None) -> LoopInputs:
    """A graph's static buffers: a 256-byte aligned copy of `inputs`, the conditioning in the dtypes the
    sessions take (so their contexts bind it in place and a replay casts once, while copying in)."""
    def feeds(values, session):
        return None if values is None else {k: aligned_copy(v, session.input(k).dtype) for k, v in values.items()}
    return replace(inputs, latents=aligned_copy(inputs.latents),
                   step_noise=None if inputs.step_noise is None else aligned_copy(inputs.step_noise),
                   guidance=aligned_copy(inputs.guidance), unet_feeds=feeds(inputs.unet_feeds, unet),
                   controlnet_feeds=feeds(inputs.controlnet_feeds, controlnet))


def bind_step(unet: Session, controlnet: Session | None, plan: SchedulePlan, static: LoopInputs, share=None):
    """(unet, controlnet) callables of one graph (`Session.bind`): static conditioning bound in place,
    the UNet's residual inputs bound at the ControlNet's outputs. share: another step's pair whose output
    buffers these reuse (per-step graphs run one after another)."""
    model_in = scale_model_input(plan, 0, torch.cat([static.latents] * 2) if static.cfg else static.latents)
    example = {"sample": model_in, "timestep": plan.timesteps[0].reshape(1)}
    bound_controlnet = None
    feeds, in_place = {**example, **static.unet_feeds}, set(static.unet_feeds)
    if controlnet is not None:
        bound_controlnet = controlnet.bind({**example, **static.controlnet_feeds}, in_place=set(static.controlnet_feeds),
                                           outputs=getattr(share and share[1], "output_buffers", None))
        residuals = {name: tensor for name, tensor in getattr(bound_controlnet, "output_buffers", {}).items()
                     if name in unet.input_names and tensor.dtype == unet.input(name).dtype}
        feeds.update(residuals)
        in_place |= set(residuals)
    bound_unet = unet.bind(feeds, in_place=in_place, outputs=getattr(share and share[0], "output_buffers", None))
    return bound_unet, bound_controlnet


def _release(pairs) -> None:
    for pair in pairs:
        for bound in pair:
            getattr(bound, "release", lambda: None)()


def _check_capturable(pairs, stream) -> None:
    for pair in pairs:
        for bound in pair:
            blocker = getattr(bound, "capture_blocker", None)
            reason = None if blocker is None else blocker(stream)
            if reason:
                raise CaptureRefused(reason)


class _WholeLoopGraph:
    """The loop captured as ONE CUDA graph over static buffers and one bound context per session;
    `__call__` copies inputs in and replays."""

    def __init__(self, unet, controlnet, plan, inputs: LoopInputs, cuda, stream):
        self.plan = plan  # the graph reads its coefficient tensors: keep them alive
        self.static = static_inputs(inputs, unet, controlnet)
        self.state = new_state(plan, self.static.latents)
        self.pairs = [bind_step(unet, controlnet, plan, self.static)]
        try:
            bound = self.pairs[0]
            denoise_eager(*bound, plan, self.static, self.state)  # one enqueue per context before capture
            _check_capturable(self.pairs, stream)
            self.graph = cuda.new_graph()
            self.output = cuda.capture(self.graph, stream, lambda: denoise_eager(*bound, plan, self.static,
                                                                                 self.state))
        except BaseException:
            self.release()
            raise

    def __call__(self, inputs: LoopInputs, should_stop: StopCheck | None = None,
                 progress: Progress | None = None) -> torch.Tensor:
        _check_stop(should_stop, 0, self.plan.num_steps)  # one launch: the only point to stop at
        _copy_into(self.static, inputs)
        if self.state.prev_x0 is not None:
            self.state.prev_x0.zero_()
        self.graph.replay()
        if progress is not None:
            progress(self.plan.num_steps, self.plan.num_steps)
        return self.output.clone()

    def release(self) -> None:
        _release(self.pairs)


class _StepGraphs:
    """One CUDA graph per step, each with its own bound contexts (fallback when the whole loop cannot be
    captured); the steps' contexts share their output buffers."""

    def __init__(self, unet, controlnet, plan, inputs: LoopInputs, cuda, stream):
        self.plan = plan
        self.static = static_inputs(inputs, unet, controlnet)
        self.state = new_state(plan, self.static.latents)
        self.pairs = []
        try:
            for i in range(plan.num_steps):
                pair = bind_step(unet, controlnet, plan, self.static, self.pairs[0] if i else None)
                if controlnet is not None and not self.static.runs_controlnet(i):
                    pair = (pair[0], ResidualBuffers(pair[1]))  # never enqueued: keep its buffers, not its context
                self.pairs.append(pair)
            latents = self.static.latents
            for i, bound in enumerate(self.pairs):  # one enqueue per context before capture
                latents = denoise_step(*bound, plan, i, latents, self.static, self.state)
            _check_capturable(self.pairs, stream)
            self.graphs, self.outputs = [], []
            source, pool = self.static.latents, cuda.graph_pool()  # one pool: replayed in capture order
            for i, bound in enumerate(self.pairs):
                graph = cuda.new_graph()
                out = cuda.capture(graph, stream, lambda i=i, bound=bound, source=source: denoise_step(
                    *bound, plan, i, source, self.static, self.state), pool=pool)
                self.graphs.append(graph)
                self.outputs.append(out)
                source = out
        except BaseException:
            self.release()
            raise

    def __call__(self, inputs: LoopInputs, should_stop: StopCheck | None = None,
                 progress: Progress | None = None) -> torch.Tensor:
        _copy_into(self.static, inputs)
        if self.state.prev_x0 is not None:
            self.state.prev_x0.zero_()
        for i, graph in enumerate(self.graphs):
            _check_stop(should_stop, i, len(self.graphs))
            graph.replay()
            if progress is not None:
                progress(i + 1, len(self.graphs))
        return self.outputs[-1].clone()

    def release(self) -> None:
        _release(self.pairs)


def _copy_into(static: LoopInputs, inputs: LoopInputs) -> None:
    for (name, target), (_, value) in zip(static.tensors(), inputs.tensors()):
        target.copy_(value, non_blocking=True)


class DenoiseLoop:
    """Runs the loop over a UNet (and optional ControlNet) session, graph-captured where possible.

    mode: 'auto' (graph on CUDA with capturable sessions, else eager), 'graph', 'step-graphs', 'eager'.
    Graphs are cached per (plan name, steps, shapes) key, at most GRAPH_CACHE_SIZE of them.
    cuda: runtime.streams.TorchCuda (default: the UNet session's `cuda`).
    """

    def __init__(self, unet: Session, controlnet: Session | None = None, mode: str = "auto", cuda=None):
        if mode not in ("auto", "graph", "step-graphs", "eager"):
            raise ValueError(f"mode must be 'auto', 'graph', 'step-graphs' or 'eager', got {mode!r}")
        self.unet, self.controlnet, self.mode = unet, controlnet, mode
        self.cuda = cuda or getattr(unet, "cuda", TORCH_CUDA)
        self._graphs: OrderedDict = OrderedDict()
        self._stream = None
        self.last_path = None  # which path the last run took: 'graph', 'step-graphs' or 'eager'

    @property
    def can_capture(self) -> bool:
        sessions = [s for s in (self.unet, self.controlnet) if s is not None]
        return all(s.capturable for s in sessions) and self.cuda.available(self.unet.device)

    def run(self, plan: SchedulePlan, inputs: LoopInputs, should_stop: Callable[[], bool] | None = None,
            progress: Progress | None = None) -> torch.Tensor:
        """Final latents (B, 4, h, w) float32 for one request.

        should_stop: eager and per-step graphs call it before every step, the whole-loop graph before its
        launch; once it returns True the run raises DenoiseCancelled (saying at which step).
        progress: called with (steps done, steps) as steps are enqueued: after every step eager and with
        per-step graphs, once after the whole-loop graph's launch.
        """
        mode = self.mode
        if mode == "auto":
            mode = "graph" if self.can_capture else "eager"
        if mode != "eager" and not self.can_capture:
            raise RuntimeError("CUDA graphs need TensorRT (or torch) sessions on a CUDA device; use mode='eager'")
        controlnet, inputs = self._window(plan, inputs)
        device = self.unet.device
        if not self.cuda.available(device):  # ONNX Runtime / CPU: no streams
            self.last_path = "eager"
            return denoise_eager(self.unet, controlnet, plan, inputs, should_stop=should_stop, progress=progress)
        if self._stream is None:
            self._stream = self.cuda.new_stream(device)
        caller = self.cuda.current_stream(device)
        with self.cuda.fork(self._stream, device):
            latents = self._run(controlnet, plan, inputs, mode, should_stop, progress)
        self.cuda.keep_alive(latents, caller)
        return latents

    def _window(self, plan: SchedulePlan, inputs: LoopInputs) -> tuple[Session | None, LoopInputs]:
        """(the ControlNet this call runs, its inputs): without a step in the ControlNet's window, none (the
        UNet gets zero residuals, as a build without a ControlNet); ValueError for a window of another length."""
        steps = inputs.controlnet_steps
        if steps is None or self.controlnet is None:
            return self.controlnet, inputs
        if len(steps) != plan.num_steps:
            raise ValueError(f"controlnet_steps has {len(steps)} entries for {plan.num_steps} steps: give one per "
                             "step (runtime.loop.control_window)")
        if any(steps):
            return self.controlnet, inputs
        latents = inputs.latents
        rows = latents.shape[0] * (2 if inputs.cfg else 1)
        zeros = zero_residuals(self.unet, rows, *latents.shape[2:])
        return None, replace(inputs, unet_feeds={**inputs.unet_feeds, **zeros}, controlnet_feeds=None,
                             controlnet_steps=None)

    def warm_up(self, plan: SchedulePlan, inputs: LoopInputs) -> str:
        """Prepare the path `run` takes at this plan (step count, scheduler) and these shapes: capture its
        graphs now (after the one enqueue per context that capture needs), so that the first request at
        the served step count and size replays. Returns the path taken ('graph', 'step-graphs', 'eager')."""
        self.run(plan, inputs)
        return self.last_path

    def _run(self, controlnet, plan, inputs, mode, should_stop, progress):
        if mode == "eager":
            self.last_path = "eager"
            return denoise_eager(self.unet, controlnet, plan, inputs, should_stop=should_stop, progress=progress)
        key = (plan.name, plan.num_steps, plan.timesteps_host, inputs.key(), _pool_generation(self.unet),
               _pool_generation(controlnet))
        runner = self._graphs.get(key)
        if runner is None:
            runner = self._capture(controlnet, plan, inputs, mode)
            self._graphs[key] = runner
            while len(self._graphs) > GRAPH_CACHE_SIZE:
                _, evicted = self._graphs.popitem(last=False)
                getattr(evicted, "release", lambda: None)()
        self._graphs.move_to_end(key)
        if runner == "eager":
            self.last_path = "eager"
            return denoise_eager(self.unet, controlnet, plan, inputs, should_stop=should_stop, progress=progress)
        self.last_path = "graph" if isinstance(runner, _WholeLoopGraph) else "step-graphs"
        return runner(inputs, should_stop, progress)

    def _capture(self, controlnet, plan, inputs, mode):
        order = [_WholeLoopGraph, _StepGraphs] if mode == "graph" else [_StepGraphs]
        for kind in order:
            try:
                return kind(self.unet, controlnet, plan, inputs, self.cuda, self._stream)
            except CaptureRefused as reason:
                log.warning("CUDA graph capture is not possible (%s); running the loop eager", reason)
                return "eager"
            except Exception as error:  # capture failures: fall back, say why once
                self.cuda.synchronize(self.unet.device)
                log.warning("CUDA graph capture (%s) failed, falling back: %s", kind.__name__, error)
        return "eager"


def _pool_generation(session) -> int:
    memory = getattr(session, "memory", None)
    return getattr(memory, "generation", 0)
