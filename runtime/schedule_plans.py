"""Host-side scheduler planning: every per-step number of a denoising run, as diffusers 0.42 computes it.

`PLANNERS[algorithm](config, alphas_cumprod, num_steps, name)` returns a `SchedulePlan` with CPU
tensors: the timesteps, the model-input divisor and the update's float32 coefficient columns, computed
with numpy and CPU float32 torch in the order and precision of diffusers' `set_timesteps` and `step`
(`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler` dpmsolver++
order 2, `DDIMScheduler` eta 0, `LCMScheduler`, `TCDScheduler`). `DEFAULTS[algorithm]` are the class
defaults of every setting that changes the numbers; `SUPPORTED` the values the updates implement.
runtime.schedulers resolves settings, moves plans to the device and runs the updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0, "rescale_betas_zero_snr": False}
_DPM = {**_COMMON, "timestep_spacing": "linspace", "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "thresholding": False, "lower_order_final": True, "euler_at_final": False,
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf, "variance_type": None, "use_dynamic_shifting": False}
# The diffusers class defaults of every setting that changes the numbers; other file keys are ignored.
DEFAULTS = {
    "euler": {**_COMMON, "timestep_spacing": "linspace", "interpolation_type": "linear", "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
              "timestep_type": "discrete", "final_sigmas_type": "zero"},
    "euler_a": {**_COMMON, "timestep_spacing": "linspace"},
    "dpmpp_2m": _DPM,
    "ddim": {**_COMMON, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
             "set_alpha_to_one": True, "thresholding": False},
    "lcm": {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
            "set_alpha_to_one": True, "thresholding": False, "timestep_spacing": "leading", "timestep_scaling": 10.0},
    # eta (gamma in the TCD paper) is an argument of TCDScheduler.step, 0.3 by default there; a diffusers
    # pipeline passes its own `eta` argument instead (0.0 unless given): pass eta=... to it to compare
    "tcd": {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "eta": 0.3},
}
SUPPORTED = {"beta_schedule": ("linear", "scaled_linear"), "prediction_type": ("epsilon", "v_prediction"),
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
    algorithm: str  # "euler" (also ancestral), "dpm", "ddim", "lcm", "tcd"
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



# ---- numpy and CPU float32 torch, as diffusers computes them ----

def alphas_cumprod_of(config: dict) -> torch.Tensor:
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


def _plan_euler(config, alphas_cumprod, num_steps, name, ancestral=False):
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


def _plan_euler_ancestral(config, alphas_cumprod, num_steps, name):
    """Euler ancestral: Euler to sigma_down, then sigma_up of fresh noise."""
    return _plan_euler(config, alphas_cumprod, num_steps, name, ancestral=True)


def _distilled_timesteps(config: dict, num_steps: int, algorithm: str) -> torch.Tensor:
    """[N] int64 timesteps of LCM and TCD: evenly indexed from the original_inference_steps schedule."""
    original = config["original_inference_steps"]
    if not 1 <= num_steps <= original or original > config["num_train_timesteps"]:
        raise ValueError(f"{algorithm}: num_steps must be in 1..original_inference_steps ({original}), got {num_steps}")
    origin = (np.arange(1, original + 1) * (config["num_train_timesteps"] // original) - 1)[::-1]
    return torch.from_numpy(origin[np.floor(np.linspace(0, original, num=num_steps, endpoint=False)).astype(np.int64)])


def _plan_lcm(config, alphas_cumprod, num_steps, name):
    """LCM: N timesteps evenly indexed from the original_inference_steps distillation schedule."""
    timesteps = _distilled_timesteps(config, num_steps, "lcm")
    following = torch.cat([timesteps[1:], timesteps[-1:]])
    scaled = timesteps * float(config["timestep_scaling"])  # boundary condition, sigma_data = 0.5
    alpha_prod, alpha_next = alphas_cumprod[timesteps], alphas_cumprod[following]
    coefficients = {"alpha_t": alpha_prod.sqrt(), "sigma_t": (1 - alpha_prod).sqrt(),
                    "c_skip": 0.25 / (scaled**2 + 0.25), "c_out": scaled / (scaled**2 + 0.25) ** 0.5,
                    "alpha_next": alpha_next.sqrt(), "sigma_next": (1 - alpha_next).sqrt()}
    return _host_plan(name, "lcm", config, timesteps.numpy(), coefficients, noise_steps=range(num_steps - 1),
                      adds_noise=[i < num_steps - 1 for i in range(num_steps)])


def _plan_tcd(config, alphas_cumprod, num_steps, name):
    """TCD: LCM's timesteps; x0 and eps re-noised to s = floor((1 - eta) * next t), then, when eta > 0 and not
    at the last step, forward-noised from s to the next timestep with fresh noise (the last step's next t is 0)."""
    eta = float(config["eta"])
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"tcd: eta (gamma) must be in [0, 1], got {eta}")
    timesteps = _distilled_timesteps(config, num_steps, "tcd")
    following = torch.cat([timesteps[1:], torch.zeros(1, dtype=torch.long)])
    s = torch.floor((1 - eta) * following).to(torch.long)  # float32, as diffusers computes it
    alpha_prod, alpha_s = alphas_cumprod[timesteps], alphas_cumprod[s]
    ratio = alphas_cumprod[following] / alpha_s
    coefficients = {"alpha_t": alpha_prod.sqrt(), "sigma_t": (1 - alpha_prod).sqrt(), "alpha_s": alpha_s.sqrt(),
                    "sigma_s": (1 - alpha_s).sqrt(), "alpha_next": ratio.sqrt(), "sigma_next": (1 - ratio).sqrt()}
    noisy = [eta > 0 and i < num_steps - 1 for i in range(num_steps)]
    return _host_plan(name, "tcd", config, timesteps.numpy(), coefficients,
                      noise_steps=[i for i in range(num_steps) if noisy[i]], adds_noise=noisy)


# algorithm -> planner(config, alphas_cumprod, num_steps, name) -> SchedulePlan with CPU tensors
PLANNERS = {"euler": _plan_euler, "euler_a": _plan_euler_ancestral, "dpmpp_2m": _plan_dpm, "ddim": _plan_ddim,
            "lcm": _plan_lcm, "tcd": _plan_tcd}
