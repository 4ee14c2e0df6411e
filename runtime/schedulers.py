"""Diffusion schedulers as per-step coefficient tables, for a denoising loop captured as one CUDA graph.

`build_scheduler(config, name)` resolves the settings; `Scheduler.plan(num_steps, device, dtype)`
computes once on the host every per-step number (model timesteps, input scaling, update
coefficients) as device tensors; `step(plan, i, ...)` is a few elementwise ops reading them, with
`i` a Python int (the loop is unrolled at capture). `step` never reads a tensor back to the host;
its Python branches read only host flags fixed per plan, so one capture serves every request.

Each update repeats diffusers 0.42's operations in the same order with the same float32 scalars
(`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`
dpmsolver++ order 2, `DDIMScheduler` with eta 0, `LCMScheduler`, `TCDScheduler`, each from
`from_config`), so on the same device in float32 the latents agree bit for bit; the per-step tables
come from runtime.schedule_plans. This module does not import diffusers.

Names (`SCHEDULERS`, what the CLI and the server accept) are presets: an algorithm plus the settings the
name fixes, e.g. `euler_trailing` = Euler with timestep_spacing "trailing" (SDXL-Lightning),
`ddim_trailing` (Hyper-SD's N-step LoRAs), `lcm` (LCM-LoRA), `tcd` (TCD-LoRA, Hyper-SD's unified LoRA).
See docs/few_step.md for the recipes.

Noise, to match a diffusers pipeline for a seed (`draw_noise` does exactly this): one
`torch.Generator` on the device diffusers draws on (a CPU generator draws on the CPU), then
  1. the initial latents: `torch.randn(shape, generator=g, dtype=dtype) * plan.init_noise_sigma`;
  2. for each i in `plan.noise_steps`, in loop order, `torch.randn(shape, generator=g, dtype=dtype)`
     (Euler ancestral draws at every step, LCM and TCD with eta > 0 at every step but the last, the
     others never),
with shape the latents' shape (batch, 4, H/8, W/8) and dtype the UNet output's dtype (for LCM,
that of its `denoised`: the same in a float32 or float16 pipeline). One generator, not a list.

The loop (unrolled, so it can be captured as one CUDA graph with the model calls):
    plan = build_scheduler(json.load(open(".../scheduler_config.json")), "euler_a").plan(30, "cuda")
    latents, step_noise = draw_noise(plan, (1, 4, 128, 128), torch.Generator().manual_seed(seed))
    state = new_state(plan, latents)          # latents, step_noise copied to the device first
    for i in range(plan.num_steps):
        noise_pred = guided_unet(scale_model_input(plan, i, latents), plan.timesteps[i])
        latents = step(plan, i, latents, noise_pred, state, None if step_noise is None else step_noise[i])
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from runtime.schedule_plans import DEFAULTS, PLANNERS, SUPPORTED, SchedulePlan, alphas_cumprod_of

# name -> (algorithm, the settings the name fixes); the names the CLI and the server accept
PRESETS = {
    "euler": ("euler", {}),
    "euler_a": ("euler_a", {}),
    "euler_trailing": ("euler", {"timestep_spacing": "trailing"}),  # SDXL-Lightning
    "dpmpp_2m": ("dpmpp_2m", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("dpmpp_2m", {"use_karras_sigmas": True}),
    "ddim": ("ddim", {}),
    "ddim_trailing": ("ddim", {"timestep_spacing": "trailing"}),  # Hyper-SD N-step LoRAs
    "lcm": ("lcm", {}),  # LCM-LoRA
    "tcd": ("tcd", {}),  # TCD-LoRA, Hyper-SD's unified LoRA (eta 0.3 unless overridden)
}
SCHEDULERS = tuple(PRESETS)


@dataclass
class SchedulerState:
    """Preallocated multistep state. prev_x0: [B, C, H, W] float32, DPM++'s previous x0; None otherwise."""

    prev_x0: torch.Tensor | None


@dataclass(frozen=True)
class Scheduler:
    """A named preset with its resolved settings: diffusers class defaults <- config file <- name <- overrides."""

    name: str
    config: dict

    @property
    def algorithm(self) -> str:
        """The diffusers scheduler this preset runs ('euler', 'euler_a', 'dpmpp_2m', 'ddim', 'lcm', 'tcd')."""
        return PRESETS[self.name][0]

    def plan(self, num_steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SchedulePlan:
        """Plan `num_steps` steps with tensors on `device`; `dtype` is the dtype of `timesteps` (the model's input)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        host = PLANNERS[self.algorithm](self.config, alphas_cumprod_of(self.config), num_steps, self.name)
        divisor = host.model_input_divisor
        return replace(host, timesteps=host.timesteps.to(device=device, dtype=dtype),
                       model_input_divisor=None if divisor is None else divisor.to(device),
                       coefficients={key: value.to(device) for key, value in host.coefficients.items()})


def build_scheduler(config: dict, name: str, **overrides) -> Scheduler:
    """A scheduler from a diffusers `scheduler_config.json` dict, the preset `name` and setting overrides.

    Like diffusers' `Class.from_config(config, **overrides)`: keys the algorithm does not use are ignored
    (`_class_name` included), then the preset's own settings apply (`dpmpp_2m_karras`: use_karras_sigmas
    True; `euler_trailing` / `ddim_trailing`: timestep_spacing "trailing"), then the overrides.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    algorithm, fixed = PRESETS[name]
    defaults = DEFAULTS[algorithm]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"scheduler {name!r} has no setting {unknown}; its settings are: {', '.join(sorted(defaults))}")
    resolved = {**defaults, **{k: v for k, v in config.items() if k in defaults}, **fixed, **overrides}
    for key, allowed in SUPPORTED.items():
        if key in resolved and resolved[key] not in allowed:
            raise ValueError(f"scheduler {name!r}: {key}={resolved[key]!r} is not supported here; use one of {allowed}")
    return Scheduler(name=name, config=resolved)


def new_state(plan: SchedulePlan, latents: torch.Tensor) -> SchedulerState:
    """Zeroed state for latents shaped like `latents` [B, C, H, W] (its device); reusable across runs."""
    prev_x0 = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device) if plan.keeps_x0 else None
    return SchedulerState(prev_x0=prev_x0)


def scale_model_input(plan: SchedulePlan, i: int, latents: torch.Tensor) -> torch.Tensor:
    """The model input at step i from latents [B, C, H, W]: Euler divides by sqrt(sigma^2 + 1), others pass through."""
    return latents if plan.model_input_divisor is None else latents / plan.model_input_divisor[i]


def step(plan: SchedulePlan, i: int, latents: torch.Tensor, noise_pred: torch.Tensor, state: SchedulerState,
         noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latents after step i (a Python int) from latents and the guided model prediction, both [B, C, H, W].

    Math in float32, result in latents.dtype. `noise` [B, C, H, W] is step i's pre-drawn noise (`draw_noise`),
    required when plan.adds_noise[i]. Multistep plans write x0 into state.prev_x0 in place.
    """
    if plan.adds_noise[i] and noise is None:
        raise ValueError(f"{plan.name} step {i} adds noise: pass noise=step_noise[{i}] from draw_noise")
    update = {"euler": _euler_update, "dpm": _dpm_update, "ddim": _ddim_update, "lcm": _lcm_update,
              "tcd": _tcd_update}[plan.algorithm]
    next_latents, x0 = update(plan, i, latents.float(), noise_pred.float(), state, noise)
    if plan.keeps_x0:
        state.prev_x0.copy_(x0)
    return next_latents.to(latents.dtype)


def draw_noise(plan: SchedulePlan, shape: tuple[int, ...], generator: torch.Generator,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial latents [*shape] and per-step noise [N, *shape] (None if none is drawn), in diffusers' order.

    Drawn on generator.device; copy them into the graph's static buffers. Rows outside noise_steps are zero.
    """
    device = generator.device
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype) * plan.init_noise_sigma
    if not plan.noise_steps:
        return latents, None
    step_noise = torch.zeros((plan.num_steps, *shape), dtype=dtype, device=device)
    for i in plan.noise_steps:
        step_noise[i] = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return latents, step_noise


# ---- the updates: diffusers' operations, in its order, on the plan's scalars ----

def _x0_variance_preserving(plan, i, x, out):
    """x0 from x = alpha_t * x0 + sigma_t * eps (DPM-Solver++, DDIM, LCM), clamped when clip_sample."""
    alpha_t, sigma_t = plan.coefficients["alpha_t"][i], plan.coefficients["sigma_t"][i]
    x0 = (x - sigma_t * out) / alpha_t if plan.prediction_type == "epsilon" else alpha_t * x - sigma_t * out
    return x0 if plan.clip_x0 is None else x0.clamp(-plan.clip_x0, plan.clip_x0)


def _euler_update(plan, i, x, out, state, noise):
    """x0 = x - sigma * eps; move along (x - x0) / sigma by dt; ancestral: add sigma_up of fresh noise."""
    c, sigma = plan.coefficients, plan.coefficients["sigma"][i]
    x0 = x - sigma * out if plan.prediction_type == "epsilon" else out * c["v_out"][i] + x / c["v_in"][i]
    next_x = x + (x - x0) / sigma * c["dt"][i]
    if plan.adds_noise[i]:
        next_x = next_x + noise * c["sigma_up"][i]
    return next_x, x0


def _dpm_update(plan, i, x, out, state, noise):
    """DPM-Solver++: first order from x0, plus 0.5 * (x0 - prev_x0) / r0 at second-order steps."""
    c = plan.coefficients
    x0 = _x0_variance_preserving(plan, i, x, out)
    next_x = c["ratio"][i] * x - c["first"][i] * x0
    if plan.uses_prev_x0[i]:
        next_x = next_x - c["second"][i] * (c["inv_r0"][i] * (x0 - state.prev_x0))
    return next_x, x0


def _ddim_update(plan, i, x, out, state, noise):
    """DDIM, eta 0: sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps."""
    c = plan.coefficients
    eps = out if plan.prediction_type == "epsilon" else c["alpha_t"][i] * out + c["sigma_t"][i] * x
    x0 = _x0_variance_preserving(plan, i, x, out)
    return c["alpha_prev"][i] * x0 + c["direction"][i] * eps, x0


def _lcm_update(plan, i, x, out, state, noise):
    """LCM: denoised = c_out * x0 + c_skip * x, re-noised to the next timestep except at the last step."""
    c = plan.coefficients
    x0 = _x0_variance_preserving(plan, i, x, out)
    denoised = c["c_out"][i] * x0 + c["c_skip"][i] * x
    if plan.adds_noise[i]:
        return c["alpha_next"][i] * denoised + c["sigma_next"][i] * noise, x0
    return denoised, x0


def _tcd_update(plan, i, x, out, state, noise):
    """TCD: x0 and eps re-noised to s; with eta > 0 and not at the last step, then noised forward to the next t."""
    c = plan.coefficients
    x0 = _x0_variance_preserving(plan, i, x, out)
    eps = out if plan.prediction_type == "epsilon" else c["alpha_t"][i] * out + c["sigma_t"][i] * x
    noised = c["alpha_s"][i] * x0 + c["sigma_s"][i] * eps
    if plan.adds_noise[i]:
        return c["alpha_next"][i] * noised + c["sigma_next"][i] * noise, x0
    return noised, x0
