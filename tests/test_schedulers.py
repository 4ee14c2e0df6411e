"""runtime.schedulers against diffusers' schedulers, step by step, with a fake deterministic model.

Every preset name (`SCHEDULERS`, what the CLI and the server accept) is checked against the diffusers
scheduler it stands for, built the way the few-step recipes build it (docs/few_step.md): e.g.
`euler_trailing` = `EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")`
(SDXL-Lightning), `tcd` = `TCDScheduler.from_config(config)` stepped with `eta`.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from runtime import schedulers
from runtime.schedulers import build_scheduler, draw_noise, new_state, scale_model_input, step

SDXL_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False, "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True,
}
STEPS = (1, 4, 25, 30)
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-6
MAX_ERRORS: dict[str, float] = {}  # worst relative error per case, printed at the end with -s


# preset -> (diffusers class, from_config settings): the recipes' own lines
REFERENCES = {
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}), "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "lcm": ("LCMScheduler", {}), "tcd": ("TCDScheduler", {}),
}
TCD_ETA = 0.3  # TCDScheduler.step's default, the `tcd` preset's


def reference(name: str, config: dict, **overrides):
    """The diffusers scheduler that `name` reproduces, built the way pipelines swap schedulers, and its step
    arguments (TCD's eta: a step argument in diffusers, a setting here)."""
    from diffusers import schedulers as classes

    class_name, settings = REFERENCES[name]
    step_kwargs = {"eta": overrides.pop("eta", TCD_ETA)} if name == "tcd" else {}
    return getattr(classes, class_name).from_config(config, **{**settings, **overrides}), step_kwargs


def fake_model(latents: torch.Tensor, timestep: float) -> torch.Tensor:
    """A fixed nonlinear stand-in for the UNet: [B, C, H, W] -> [B, C, H, W]."""
    phase = torch.arange(latents.shape[1], dtype=torch.float32, device=latents.device).view(1, -1, 1, 1)
    phase = phase + timestep / 97.0
    return torch.tanh(0.8 * latents + torch.sin(phase)) + 0.05 * latents * torch.cos(phase)


class NoHostSync(TorchFunctionMode):
    """Fails on any tensor op that reads device data back to the host."""

    FORBIDDEN = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FORBIDDEN:
            raise AssertionError(f"host sync in the step path: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def run_side_by_side(name: str, num_steps: int, config: dict = SDXL_CONFIG, seed: int = 0, **overrides) -> float:
    """Run both schedulers through the loop; assert per-step agreement; return the worst relative error."""
    from diffusers.utils.torch_utils import randn_tensor

    ref, step_kwargs = reference(name, config, **dict(overrides))
    ref.set_timesteps(num_steps)
    plan = build_scheduler(config, name, **overrides).plan(num_steps, "cpu", torch.float32)
    assert plan.init_noise_sigma == float(ref.init_noise_sigma)
    assert torch.equal(plan.timesteps, ref.timesteps.to(torch.float32)), (plan.timesteps, ref.timesteps)

    ref_generator = torch.Generator().manual_seed(seed)  # as the pipeline: latents first, then scheduler.step draws
    ref_latents = randn_tensor(SHAPE, generator=ref_generator, dtype=torch.float32) * ref.init_noise_sigma
    latents, step_noise = draw_noise(plan, SHAPE, torch.Generator().manual_seed(seed))
    assert torch.equal(latents, ref_latents)
    state = new_state(plan, latents)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        ref_out = fake_model(ref.scale_model_input(ref_latents, t), float(t))
        ref_latents = ref.step(ref_out, t, ref_latents, generator=ref_generator, **step_kwargs).prev_sample
        with NoHostSync():
            model_input = scale_model_input(plan, i, latents)
        out = fake_model(model_input, plan.timesteps_host[i])
        with NoHostSync():
            latents = step(plan, i, latents, out, state, None if step_noise is None else step_noise[i])
        error = float((latents - ref_latents).norm() / ref_latents.norm())
        assert error <= TOLERANCE, f"{name} {num_steps} steps: step {i} relative error {error:.2e}"
        worst = max(worst, error)
    assert torch.isfinite(latents).all()
    MAX_ERRORS[f"{name} {overrides or ''} {num_steps}"] = worst
    return worst


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("name", schedulers.SCHEDULERS)
def test_matches_diffusers(name, num_steps):
    run_side_by_side(name, num_steps)


@pytest.mark.parametrize("name", ["euler", "euler_a", "euler_trailing", "dpmpp_2m", "ddim", "ddim_trailing", "lcm",
                                  "tcd"])
def test_v_prediction(name):
    for num_steps in (4, 25):
        run_side_by_side(name, num_steps, prediction_type="v_prediction")


@pytest.mark.parametrize("overrides", [
    {"use_karras_sigmas": True},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"},
])
def test_euler_options(overrides):
    for num_steps in (1, 4, 30):
        run_side_by_side("euler", num_steps, **overrides)


@pytest.mark.parametrize("overrides", [
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_dpm_options(name, overrides):
    for num_steps in (4, 20):
        run_side_by_side(name, num_steps, **overrides)


def test_ddim_and_lcm_options():
    run_side_by_side("ddim", 10, clip_sample=True, set_alpha_to_one=True)
    run_side_by_side("ddim", 10, timestep_spacing="trailing")
    run_side_by_side("ddim", 7, timestep_spacing="linspace")
    for num_steps in (1, 4, 8):
        run_side_by_side("lcm", num_steps, config={})  # LCMScheduler() with its own defaults


@pytest.mark.parametrize("name", ["euler_a", "lcm", "tcd"])
def test_noise_matches_diffusers_generator_order(name):
    """Different seeds give different results, and each matches diffusers drawing from its own generator."""
    plan = build_scheduler(SDXL_CONFIG, name).plan(4)
    assert plan.noise_steps == (tuple(range(4)) if name == "euler_a" else (0, 1, 2))
    _, noise_a = draw_noise(plan, SHAPE, torch.Generator().manual_seed(1))
    _, noise_b = draw_noise(plan, SHAPE, torch.Generator().manual_seed(2))
    assert not torch.equal(noise_a, noise_b)
    for seed in (1, 2):
        run_side_by_side(name, 4, seed=seed)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_gamma(eta):
    """TCD's eta (gamma): 0 is deterministic (no noise drawn), 1 re-noises from x0; each as diffusers steps it."""
    for num_steps in (1, 2, 4, 8):
        run_side_by_side("tcd", num_steps, eta=eta)
    plan = build_scheduler(SDXL_CONFIG, "tcd", eta=eta).plan(4)
    assert plan.noise_steps == ((0, 1, 2) if eta > 0 else ())


def test_few_step_recipes():
    """The settings the few-step recipes name, as the presets resolve them from SDXL's scheduler config."""
    lightning = build_scheduler(SDXL_CONFIG, "euler_trailing")
    assert lightning.config["timestep_spacing"] == "trailing" and lightning.algorithm == "euler"
    assert build_scheduler(SDXL_CONFIG, "euler_trailing").plan(4).timesteps_host == (999.0, 749.0, 499.0, 249.0)
    assert build_scheduler(SDXL_CONFIG, "ddim_trailing").plan(4).timesteps_host == (999.0, 749.0, 499.0, 249.0)
    assert build_scheduler(SDXL_CONFIG, "euler").plan(4).timesteps_host == (751.0, 501.0, 251.0, 1.0)  # leading
    assert build_scheduler(SDXL_CONFIG, "lcm").plan(8).timesteps_host == (999, 879, 759, 639, 499, 379, 259, 139)
    assert build_scheduler(SDXL_CONFIG, "tcd").plan(4).timesteps_host == (999, 759, 499, 259)
    for name in ("euler_trailing", "ddim_trailing", "lcm", "tcd"):
        for num_steps in (1, 2, 4, 8):
            run_side_by_side(name, num_steps)


def test_host_sync_guard_catches_syncs():
    """The guard used around scale_model_input/step really fails on host reads."""
    x = torch.ones(2)
    for sync in (lambda: x[0].item(), lambda: bool(x[0] > 0), lambda: x.cpu(), lambda: float(x[0])):
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            sync()


def test_step_requires_noise_when_stochastic():
    plan = build_scheduler(SDXL_CONFIG, "euler_a").plan(4)
    latents = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="adds noise"):
        step(plan, 0, latents, latents, new_state(plan, latents))


def test_plan_tensors_and_dtypes():
    plan = build_scheduler(SDXL_CONFIG, "dpmpp_2m").plan(25, "cpu", torch.float16)
    assert plan.timesteps.dtype == torch.float16 and plan.timesteps.shape == (25,)
    assert all(c.shape == (25,) and c.dtype == torch.float32 for c in plan.coefficients.values())
    assert plan.keeps_x0 and new_state(plan, torch.zeros(SHAPE)).prev_x0.shape == SHAPE
    assert draw_noise(plan, SHAPE, torch.Generator().manual_seed(0))[1] is None
    assert plan.uses_prev_x0 == (False,) + (True,) * 23 + (False,)  # lower_order_final: first order at the end


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "euler_a"])
def test_state_reuse_and_half_latents(name):
    """A second run on the same state repeats the first; float16 latents stay float16 and close to float32."""
    plan = build_scheduler(SDXL_CONFIG, name).plan(6)
    initial, step_noise = draw_noise(plan, SHAPE, torch.Generator().manual_seed(3))
    state = new_state(plan, initial)

    def run(latents):
        for i in range(plan.num_steps):
            out = fake_model(scale_model_input(plan, i, latents).float(), plan.timesteps_host[i]).to(latents.dtype)
            latents = step(plan, i, latents, out, state, None if step_noise is None else step_noise[i])
        return latents

    first = run(initial)
    assert torch.equal(run(initial), first)
    half = run(initial.half())
    assert half.dtype == torch.float16
    assert float((half.float() - first).norm() / first.norm()) < 1e-2


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="euler, euler_a, euler_trailing, dpmpp_2m, dpmpp_2m_karras, ddim, "
                                         "ddim_trailing, lcm, tcd"):
        build_scheduler(SDXL_CONFIG, "heun")
    with pytest.raises(ValueError, match="has no setting"):
        build_scheduler(SDXL_CONFIG, "euler", use_karas_sigmas=True)
    with pytest.raises(ValueError, match="not supported"):
        build_scheduler(SDXL_CONFIG, "ddim", thresholding=True)
    with pytest.raises(ValueError, match="num_steps"):
        build_scheduler(SDXL_CONFIG, "lcm").plan(51)
    with pytest.raises(ValueError, match="eta"):
        build_scheduler(SDXL_CONFIG, "tcd", eta=1.5).plan(4)


def test_import_does_not_pull_diffusers():
    code = ("import sys, runtime.schedulers; bad = {'diffusers', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras", "lcm", "tcd"])
def test_whole_loop_in_one_cuda_graph(name):
    """The unrolled loop, scheduler included, captured once and replayed, equals the eager loop."""
    plan = build_scheduler(SDXL_CONFIG, name).plan(8, "cuda")
    initial, step_noise = draw_noise(plan, SHAPE, torch.Generator().manual_seed(0))
    initial = initial.cuda()
    step_noise = step_noise.cuda() if step_noise is not None else None

    def loop(latents, state):
        for i in range(plan.num_steps):
            out = fake_model(scale_model_input(plan, i, latents), plan.timesteps_host[i])
            latents = step(plan, i, latents, out, state, None if step_noise is None else step_noise[i])
        return latents

    eager = loop(initial.clone(), new_state(plan, initial))
    static_in, state = initial.clone(), new_state(plan, initial)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(static_in, state)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_in, state)
    static_in.copy_(initial)
    graph.replay()
    torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)


def teardown_module(module):
    for case, error in sorted(MAX_ERRORS.items()):
        print(f"max rel error {case}: {error:.2e}")
