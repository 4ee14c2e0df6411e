"""Diffusion schedulers as per-step coefficient tables, for a denoising loop captured as one CUDA graph.

`build_scheduler(config, name)` resolves the settings; `Scheduler.plan(num_steps, device, dtype)`
computes once on the host every per-step number (model timesteps, input scaling, update
coefficients) as device tensors; `step(plan, i, ...)` is a few elementwise ops reading them, with
`i` a Python int (the loop is unrolled at capture). `step` never reads a tensor back to the host;
its Python branches read only host flags fixed per plan, so one capture serves every request.

Each update repeats diffusers 0.42's operations in the same order with the same float32 scalars
(`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`
dpmsolver++ order 2, `DDIMScheduler` with eta 0, `LCMScheduler`, each from `from_config`), so on
the same device in float32 the latents agree bit for bit. This module does not import diffusers.

Noise, to match a diffusers pipeline for a seed (`draw_noise` does exactly this): one
`torch.Generator` on the device diffusers draws on (a CPU generator draws on the CPU), then
  1. the initial latents: `torch.randn(shape, generator=g, dtype=dtype) * plan.init_noise_sigma`;
  2. for each i in `plan.noise_steps`, in loop order, `torch.randn(shape, generator=g, dtype=dtype)`
     (Euler ancestral draws at every step, LCM at every step but the last, the others never),
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

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm")

_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0, "rescale_betas_zero_snr": False}
_DPM = {**_COMMON, "timestep_spacing": "linspace", "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "thresholding": False, "lower_order_final": True, "euler_at_final": False,
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf, "variance_type": None, "use_dynamic_shifting": False}
# The diffusers class defaults of every setting that changes the numbers; other file keys are ignored.
_DEFAULTS = {
    "euler": {**_COMMON, "timestep_spacing": "linspace", "interpolation_type": "linear", "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
              "timestep_type": "discrete", "final_sigmas_type": "zero"},
    "euler_a": {**_COMMON, "timestep_spacing": "linspace"},
    "dpmpp_2m": _DPM,
    "dpmpp_2m_karras": _DPM,
    "ddim": {**_COMMON, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
             "set_alpha_to_one": True, "thresholding": False},
    "lcm": {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
            "set_alpha_to_one": True, "thresholding": False, "timestep_spacing": "leading", "timestep_scaling": 10.0},
}
_NAME_SETS = {"dpmpp_2m": {"use_karras_sigmas": False}, "dpmpp_2m_karras": {"use_karras_sigmas": True}}
_SUPPORTED = {"beta_schedule": ("linear", "scaled_linear"), "prediction_type": ("epsilon", "v_prediction"),
              "timestep_spacing": ("leading", "trailing", "linspace"), "final_sigmas_type": ("zero", "sigma_min"),
              "interpolation_type": ("linear",), "timestep_type": ("discrete",), "solver_order": (2,),
              "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",), "variance_type": (None,),
              **{key: (False,) for key in ("rescale_betas_zero_snr", "use_exponential_sigmas", "use_beta_sigmas",
                                           "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting",
                                           "thresholding")}}


@dataclass(frozen=True)
class SchedulePlan:
    """One denoising run of N steps, computed once on the host; tensors live on the plan's device.

    timesteps: [N] in the plan's dtype, the `timestep` input of the UNet/ControlNet at step i.
    model_input_divisor: [N] float32, model input = latents / divisor[i]; None when the input is unscaled.
    coefficients: name -> [N] float32, the update's per-step scalars (names per algorithm, see _plan_*).
    noise_steps: the steps at which diffusers draws noise from the generator, in order.
    adds_noise / uses_prev_x0: host flags per step, fixed per plan, that shape the captured ops.
    """

    name: str
    algorithm: str  # "euler" (also ancestral), "dpm", "ddim", "lcm"
    prediction_type: str
    timesteps: torch.Tensor
    timesteps_host: tuple[float, ...]
    model_input_divisor: torch.Tensor | None
    coefficients: dict[str, torch.Tensor]
    init_noise_sigma: float
    noise_steps: tuple[int, ...]
    adds_noise: tuple[bool, ...]
    uses_prev_x0: tuple[bool, ...]
    clip_x0: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps_host)

    @property
    def keeps_x0(self) -> bool:
        """Multistep: `step` writes each x0 into `SchedulerState.prev_x0`."""
        return self.algorithm == "dpm"


@dataclass
class SchedulerState:
    """Preallocated multistep state. prev_x0: [B, C, H, W] float32, DPM++'s previous x0; None otherwise."""

    prev_x0: torch.Tensor | None


@dataclass(frozen=True)
class Scheduler:
    """One algorithm with its resolved settings: diffusers class defaults <- config file <- name <- overrides."""

    name: str
    config: dict

    def plan(self, num_steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SchedulePlan:
        """Plan `num_steps` steps with tensors on `device`; `dtype` is the dtype of `timesteps` (the model's input)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        planner = {"euler": _plan_euler, "euler_a": _plan_euler, "dpmpp_2m": _plan_dpm, "dpmpp_2m_karras": _plan_dpm,
                   "ddim": _plan_ddim, "lcm": _plan_lcm}[self.name]
        host = planner(self.config, _alphas_cumprod(self.config), num_steps, self.name)
        divisor = host.model_input_divisor
        return replace(host, timesteps=host.timesteps.to(device=device, dtype=dtype),
                       model_input_divisor=None if divisor is None else divisor.to(device),
                       coefficients={key: value.to(device) for key, value in host.coefficients.items()})


def build_scheduler(config: dict, name: str, **overrides) -> Scheduler:
    """A scheduler from a diffusers `scheduler_config.json` dict, the algorithm `name` and setting overrides.

    Like diffusers' `Class.from_config(config, **overrides)`: keys the algorithm does not use are ignored
    (`_class_name` included); `dpmpp_2m` / `dpmpp_2m_karras` set `use_karras_sigmas` False / True.
    """
    if name not in _DEFAULTS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    defaults = _DEFAULTS[name]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"scheduler {name!r} has no setting {unknown}; its settings are: {', '.join(sorted(defaults))}")
    resolved = {**defaults, **{k: v for k, v in config.items() if k in defaults}, **_NAME_SETS.get(name, {}), **overrides}
    for key, allowed in _SUPPORTED.items():
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
    update = {"euler": _euler_update, "dpm": _dpm_update, "ddim": _ddim_update, "lcm": _lcm_update}[plan.algorithm]
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


# ---- host-side planning: numpy and CPU float32 torch, as diffusers computes them ----

def _alphas_cumprod(config: dict) -> torch.Tensor:
    """[T] float32 cumulative product of (1 - beta)."""
    steps = config["num_train_timesteps"]
    if config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], steps, dtype=torch.float32)
    else:  # scaled_linear: linear in sqrt(beta)
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _spaced_timesteps(config: dict, num_steps: int) -> np.ndarray:
    """[N] descending float64 timesteps for Euler and DDIM by timestep_spacing (linspace ones unrounded)."""
    total = config["num_train_timesteps"]
    if config["timestep_spacing"] == "leading":
        return (np.arange(num_steps) * (total // num_steps))[::-1] + float(config["steps_offset"])
    if config["timestep_spacing"] == "trailing":
        return np.round(np.arange(total, 0, -total / num_steps)) - 1.0
    return np.linspace(0, total - 1, num_steps)[::-1].copy()


def _karras(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """[N] float64 noise levels of Karras et al. (2022), rho = 7, from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    top, bottom = sigma_max ** (1 / 7.0), sigma_min ** (1 / 7.0)
    return (top + ramp * (bottom - top)) ** 7.0


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """[N] float64 fractional timesteps: each sigma located by linear interpolation in log_sigmas [T] float32."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    count = np.searchsorted(log_sigmas.astype(np.float64), log_sigma, side="right")
    low = np.clip(count - 1, 0, len(log_sigmas) - 2)
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def _train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """[T] float32 sqrt((1 - a) / a), ascending with t."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def _with_final_sigma(sigmas: np.ndarray, config: dict, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """[N + 1] float32: sigmas then 0 ("zero") or the smallest training sigma ("sigma_min")."""
    zero = config.get("final_sigmas_type", "zero") == "zero"
    final = 0.0 if zero else float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
    return torch.from_numpy(np.append(sigmas, final).astype(np.float32))


def _host_plan(name, algorithm, config, timesteps, coefficients, init_noise_sigma=1.0, model_input_divisor=None,
               noise_steps=(), adds_noise=None, uses_prev_x0=None) -> SchedulePlan:
    """A plan with CPU tensors from a planner's float32 coefficient columns."""
    num_steps = len(timesteps)
    return SchedulePlan(
        name=name, algorithm=algorithm, prediction_type=config["prediction_type"],
        timesteps=torch.from_numpy(np.asarray(timesteps, dtype=np.float32)),
        timesteps_host=tuple(float(t) for t in timesteps), model_input_divisor=model_input_divisor,
        coefficients={key: value.to(torch.float32) for key, value in coefficients.items()},
        init_noise_sigma=float(init_noise_sigma), noise_steps=tuple(noise_steps),
        adds_noise=tuple(adds_noise or [False] * num_steps), uses_prev_x0=tuple(uses_prev_x0 or [False] * num_steps),
        clip_x0=float(config["clip_sample_range"]) if config.get("clip_sample", False) else None)


def _plan_euler(config, alphas_cumprod, num_steps, name):
    """Euler (ODE) or Euler ancestral on sigmas interpolated at the timesteps (or Karras sigmas)."""
    train_sigmas = _train_sigmas(alphas_cumprod)
    timesteps = _spaced_timesteps(config, num_steps).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if config.get("use_karras_sigmas", False):
        sigma_min = config["sigma_min"] if config["sigma_min"] is not None else sigmas[-1]
        sigma_max = config["sigma_max"] if config["sigma_max"] is not None else sigmas[0]
        sigmas = _karras(sigma_min, sigma_max, num_steps)
        timesteps = _sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
    sigmas = _with_final_sigma(sigmas, config, alphas_cumprod)
    sigma, sigma_to = sigmas[:-1], sigmas[1:]
    coefficients = {"sigma": sigma, "dt": sigma_to - sigma, "v_out": -sigma / (sigma**2 + 1) ** 0.5, "v_in": sigma**2 + 1}
    ancestral = name == "euler_a"
    if ancestral:  # step to sigma_down deterministically, then add sigma_up of fresh noise
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        coefficients.update(sigma_up=sigma_up, dt=(sigma_to**2 - sigma_up**2) ** 0.5 - sigma)
    init = sigmas.max() if config["timestep_spacing"] != "leading" else (sigmas.max() ** 2 + 1) ** 0.5
    return _host_plan(name, "euler", config, timesteps, coefficients, init, (sigma**2 + 1) ** 0.5,
                      noise_steps=range(num_steps) if ancestral else (),
                      adds_noise=[bool(up != 0) for up in coefficients["sigma_up"]] if ancestral else None)


def _plan_dpm(config, alphas_cumprod, num_steps, name):
    """DPM-Solver++(2M): first order at step 0 (and the last, per lower_order_final), second order between."""
    total, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    lambdas = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    last = total - int(torch.searchsorted(torch.flip(lambdas, [0]), config["lambda_min_clipped"]))
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(num_steps + 1) * (last // (num_steps + 1)))[::-1][:-1] + config["steps_offset"]
    else:
        timesteps = np.round(np.arange(last, 0, -total / num_steps)) - 1
    train_sigmas = _train_sigmas(alphas_cumprod)
    if config["use_karras_sigmas"]:
        sigmas = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
        timesteps = _sigma_to_t(sigmas, np.log(train_sigmas)).round()
    else:
        sigmas = np.interp(timesteps.astype(np.int64), np.arange(len(train_sigmas)), train_sigmas)
    timesteps = timesteps.astype(np.int64)
    sigmas = _with_final_sigma(sigmas, config, alphas_cumprod)
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)  # VP alpha_t, sigma_t of each VE sigma, as diffusers converts them
    sigma_vp = sigmas * alpha
    last_first_order = config["euler_at_final"] or config["final_sigmas_type"] == "zero" or (
        config["lower_order_final"] and num_steps < 15)
    second = [0 < i and not (i == num_steps - 1 and last_first_order) for i in range(num_steps)]

    def log_snr(k):  # lambda = log(alpha_t) - log(sigma_t), one 0-d float32 op at a time as diffusers
        return torch.log(alpha[k]) - torch.log(sigma_vp[k])

    ratio, first, inv_r0 = [], [], []
    for i in range(num_steps):
        h = log_snr(i + 1) - log_snr(i)
        ratio.append(sigma_vp[i + 1] / sigma_vp[i])
        first.append(alpha[i + 1] * (torch.exp(-h) - 1.0))
        inv_r0.append(1.0 / ((log_snr(i) - log_snr(i - 1)) / h) if second[i] else torch.tensor(0.0))
    first = torch.stack(first)
    coefficients = {"ratio": torch.stack(ratio), "first": first, "second": 0.5 * first, "inv_r0": torch.stack(inv_r0),
                    "alpha_t": alpha[:-1], "sigma_t": sigma_vp[:-1]}
    return _host_plan(name, "dpm", config, timesteps, coefficients, uses_prev_x0=second)


def _plan_ddim(config, alphas_cumprod, num_steps, name):
    """DDIM, eta 0, stepping back num_train_timesteps // N from each timestep."""
    total = config["num_train_timesteps"]
    if num_steps > total:
        raise ValueError(f"ddim: num_steps {num_steps} exceeds num_train_timesteps {total}")
    timesteps = torch.from_numpy(np.round(_spaced_timesteps(config, num_steps)).astype(np.int64))
    previous = timesteps - total // num_steps
    final = torch.tensor(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]
    alpha_prod = alphas_cumprod[timesteps]
    alpha_prev = torch.where(previous >= 0, alphas_cumprod[previous.clamp(min=0)], final)
    coefficients = {"alpha_t": alpha_prod**0.5, "sigma_t": (1 - alpha_prod) ** 0.5,
                    "alpha_prev": alpha_prev**0.5, "direction": (1 - alpha_prev) ** 0.5}
    return _host_plan(name, "ddim", config, timesteps.numpy(), coefficients)


def _plan_lcm(config, alphas_cumprod, num_steps, name):
    """LCM: N timesteps evenly indexed from the original_inference_steps distillation schedule."""
    original = config["original_inference_steps"]
    if not 1 <= num_steps <= original or original > config["num_train_timesteps"]:
        raise ValueError(f"lcm: num_steps must be in 1..original_inference_steps ({original}), got {num_steps}")
    origin = (np.arange(1, original + 1) * (config["num_train_timesteps"] // original) - 1)[::-1]
    timesteps = torch.from_numpy(origin[np.floor(np.linspace(0, original, num=num_steps, endpoint=False)).astype(np.int64)])
    following = torch.cat([timesteps[1:], timesteps[-1:]])
    scaled = timesteps * float(config["timestep_scaling"])  # boundary condition, sigma_data = 0.5
    alpha_prod, alpha_next = alphas_cumprod[timesteps], alphas_cumprod[following]
    coefficients = {"alpha_t": alpha_prod.sqrt(), "sigma_t": (1 - alpha_prod).sqrt(),
                    "c_skip": 0.25 / (scaled**2 + 0.25), "c_out": scaled / (scaled**2 + 0.25) ** 0.5,
                    "alpha_next": alpha_next.sqrt(), "sigma_next": (1 - alpha_next).sqrt()}
    return _host_plan(name, "lcm", config, timesteps.numpy(), coefficients, noise_steps=range(num_steps - 1),
                      adds_noise=[i < num_steps - 1 for i in range(num_steps)])
