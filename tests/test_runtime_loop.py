"""runtime.loop: the eager loop over sessions equals the baseline's diffusers loop (toy models, CPU);
CUDA-graph paths are refused with a clear error without a GPU (they run only on a GPU)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.baseline import make_scheduler
from export.specs import SCHEDULER_CONFIG
from runtime.loop import DenoiseCancelled, DenoiseLoop, LoopInputs, clone_inputs
from runtime.schedulers import build_scheduler, draw_noise
from engine.tensors import TensorSpec
from runtime.sessions import TorchSession

ROWS_AXIS = "2B"


class ToyControlNet(torch.nn.Module):
    """Two 'residuals' from sample, timestep, face tokens and the conditioning scale."""

    def forward(self, sample, timestep, face_tokens, control_image, text_embeds, time_ids, conditioning_scale):
        base = sample * 0.3 + face_tokens.mean(dim=(1, 2))[:, None, None, None] + control_image.mean()
        return base * conditioning_scale, (base.mean(dim=1, keepdim=True) + timestep / 1000) * conditioning_scale


class ToyUNet(torch.nn.Module):
    """noise_pred depends on every input, so a wiring mistake changes the result."""

    def forward(self, sample, timestep, text_tokens, ip_tokens, ip_scale, text_embeds, time_ids, down_residual_0,
                mid_residual):
        context = text_tokens.mean(dim=(1, 2)) + ip_scale.mean() * ip_tokens.mean(dim=(1, 2)) + text_embeds.mean(1)
        return (torch.tanh(sample) * 0.5 + context[:, None, None, None] * 0.1 + time_ids[:, :1, None, None] * 1e-3
                + down_residual_0 * 0.2 + mid_residual * 0.1 + torch.cos(timestep / 300))


def _info(name, *dims):
    return TensorSpec(name, torch.float32, dims)


def _sessions():
    latent = (ROWS_AXIS, 4, "latent_height", "latent_width")
    residuals = [_info("down_residual_0", *latent), _info("mid_residual", ROWS_AXIS, 1, "latent_height",
                                                               "latent_width")]
    common = [_info("text_embeds", ROWS_AXIS, 8), _info("time_ids", ROWS_AXIS, 6)]
    controlnet = TorchSession(ToyControlNet(), [
        _info("sample", *latent), _info("timestep", 1), _info("face_tokens", ROWS_AXIS, 3, 5),
        _info("control_image", ROWS_AXIS, 3, "height", "width"), *common, _info("conditioning_scale", 1)],
        residuals, name="controlnet")
    unet = TorchSession(ToyUNet(), [
        _info("sample", *latent), _info("timestep", 1), _info("text_tokens", ROWS_AXIS, 7, 5),
        _info("ip_tokens", ROWS_AXIS, 3, 5), _info("ip_scale", 4), *common, *residuals],
        [_info("noise_pred", *latent)], name="unet")
    return unet, controlnet


def _conditioning(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * batch
    return {
        "text_tokens": torch.randn(rows, 7, 5, generator=generator),
        "ip_tokens": torch.randn(rows, 3, 5, generator=generator),
        "text_embeds": torch.randn(rows, 8, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]]).repeat(rows, 1),
        "control_image": torch.rand(rows, 3, 64, 64, generator=generator),
    }


def _reference(name, steps, batch, guidance, ip_scale, cn_scale, seed, cond):
    """The baseline's loop (benchmarks/baseline.py SDXLBase.denoise) with diffusers' scheduler."""
    sched = make_scheduler(SCHEDULER_CONFIG, name)
    sched.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((batch, 4, 8, 8), generator=generator, dtype=torch.float32) * sched.init_noise_sigma
    unet, controlnet = ToyUNet(), ToyControlNet()
    scale = torch.full((4,), ip_scale)
    for t in sched.timesteps:
        model_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        t1 = t.reshape(1).float()
        down, mid = controlnet(model_in, t1, cond["ip_tokens"], cond["control_image"], cond["text_embeds"],
                               cond["time_ids"], torch.tensor([cn_scale]))
        noise = unet(model_in, t1, cond["text_tokens"], cond["ip_tokens"], scale, cond["text_embeds"],
                     cond["time_ids"], down, mid)
        uncond, positive = noise.chunk(2)
        noise = uncond + guidance * (positive - uncond)
        latents = sched.step(noise, t, latents, generator=generator, return_dict=False)[0]
    return latents


def _inputs(name, steps, batch, guidance, ip_scale, cn_scale, seed, cond):
    plan = build_scheduler(SCHEDULER_CONFIG, name).plan(steps)
    latents, step_noise = draw_noise(plan, (batch, 4, 8, 8), torch.Generator().manual_seed(seed))
    unet_feeds = {k: cond[k] for k in ("text_tokens", "ip_tokens", "text_embeds", "time_ids")}
    unet_feeds["ip_scale"] = torch.full((4,), ip_scale)
    controlnet_feeds = {"face_tokens": cond["ip_tokens"], "control_image": cond["control_image"],
                        "text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"],
                        "conditioning_scale": torch.tensor([cn_scale])}
    return plan, LoopInputs(latents, step_noise, torch.tensor(guidance), unet_feeds, controlnet_feeds)


@pytest.mark.parametrize("name,batch", [("euler", 1), ("euler_a", 2), ("dpmpp_2m", 1), ("ddim", 2)])
def test_eager_loop_equals_the_baseline_loop(name, batch):
    unet, controlnet = _sessions()
    cond = _conditioning(batch)
    args = (name, 4, batch, 5.0, 0.7, 0.4, 3, cond)
    plan, inputs = _inputs(*args)
    loop = DenoiseLoop(unet, controlnet)
    latents = loop.run(plan, inputs)
    assert loop.last_path == "eager"
    expected = _reference(*args)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


def test_scales_are_runtime_inputs():
    """λ, the ControlNet scale and guidance change the result with the same sessions and plan."""
    unet, controlnet = _sessions()
    cond = _conditioning(1)
    loop = DenoiseLoop(unet, controlnet)
    plan, base = _inputs("euler", 3, 1, 5.0, 0.7, 0.4, 0, cond)
    first = loop.run(plan, base)
    other = clone_inputs(base)
    other.guidance.fill_(2.0)
    assert not torch.allclose(loop.run(plan, other), first)
    other = clone_inputs(base)
    other.unet_feeds["ip_scale"].fill_(0.0)
    assert not torch.allclose(loop.run(plan, other), first)
    other = clone_inputs(base)
    other.controlnet_feeds["conditioning_scale"].fill_(1.0)
    assert not torch.allclose(loop.run(plan, other), first)
    torch.testing.assert_close(loop.run(plan, base), first, rtol=0, atol=0)  # deterministic


def test_loop_inputs_key_and_cfg():
    _, inputs = _inputs("euler", 2, 2, 5.0, 0.5, 0.5, 0, _conditioning(2))
    assert inputs.cfg
    copy = clone_inputs(inputs)
    assert copy.key() == inputs.key() and copy.latents is not inputs.latents
    names = [name for name, _ in inputs.tensors()]
    assert names[:2] == ["latents", "guidance"] and "step_noise" not in names  # Euler draws no step noise
    assert "unet_feeds.ip_scale" in names and "controlnet_feeds.conditioning_scale" in names


def test_graph_modes_need_cuda_sessions():
    unet, controlnet = _sessions()
    with pytest.raises(ValueError, match="mode must be"):
        DenoiseLoop(unet, controlnet, mode="fast")
    plan, inputs = _inputs("euler", 2, 1, 5.0, 0.5, 0.5, 0, _conditioning(1))
    for mode in ("graph", "step-graphs"):
        with pytest.raises(RuntimeError, match="CUDA graphs need TensorRT"):
            DenoiseLoop(unet, controlnet, mode=mode).run(plan, inputs)


def test_should_stop_cancels_between_steps():
    """The eager loop asks before every step; True stops it with DenoiseCancelled naming the step."""
    unet, controlnet = _sessions()
    plan, inputs = _inputs("euler", 4, 1, 5.0, 0.5, 0.5, 0, _conditioning(1))
    loop, asked = DenoiseLoop(unet, controlnet), []

    def should_stop():
        asked.append(len(asked))
        return len(asked) == 3

    with pytest.raises(DenoiseCancelled, match="before step 3 of 4"):
        loop.run(plan, inputs, should_stop=should_stop)
    assert asked == [0, 1, 2] and issubclass(DenoiseCancelled, RuntimeError)
    torch.testing.assert_close(loop.run(plan, inputs, should_stop=lambda: False), loop.run(plan, inputs),
                               rtol=0, atol=0)


def test_progress_reports_every_step():
    """progress(done, steps) after every eager step, and the latents are those of a run without it."""
    unet, controlnet = _sessions()
    plan, inputs = _inputs("euler", 4, 1, 5.0, 0.5, 0.5, 0, _conditioning(1))
    loop, seen = DenoiseLoop(unet, controlnet), []
    latents = loop.run(plan, inputs, progress=lambda done, steps: seen.append((done, steps)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    torch.testing.assert_close(latents, loop.run(plan, inputs), rtol=0, atol=0)


def _to(inputs: LoopInputs, device) -> LoopInputs:
    moved = clone_inputs(inputs)
    moved.latents, moved.guidance = moved.latents.to(device), moved.guidance.to(device)
    moved.step_noise = None if moved.step_noise is None else moved.step_noise.to(device)
    moved.unet_feeds = {k: v.to(device) for k, v in moved.unet_feeds.items()}
    moved.controlnet_feeds = {k: v.to(device) for k, v in moved.controlnet_feeds.items()}
    return moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["graph", "step-graphs"])
@pytest.mark.parametrize("name,batch", [("euler", 1), ("euler_a", 2), ("dpmpp_2m", 2)])
def test_cuda_graph_loop_equals_eager_and_replays_new_values(mode, name, batch):
    """Captured once, replayed with other values (seed, conditioning, guidance, scales): each replay equals
    the eager loop on those values; the graph is reused (one capture per key)."""
    device = torch.device("cuda")
    unet, controlnet = _sessions()
    for session in (unet, controlnet):
        session.module.to(device)
        session.device, session.capturable = device, True
    plan = build_scheduler(SCHEDULER_CONFIG, name).plan(4, device)
    loop, eager = DenoiseLoop(unet, controlnet, mode=mode), DenoiseLoop(unet, controlnet, mode="eager")
    for seed, guidance, ip_scale, cn_scale in ((3, 5.0, 0.7, 0.4), (8, 2.5, 0.1, 0.9), (3, 5.0, 0.7, 0.4)):
        _, inputs = _inputs(name, 4, batch, guidance, ip_scale, cn_scale, seed, _conditioning(batch, seed))
        inputs = _to(inputs, device)
        latents = loop.run(plan, inputs)
        assert loop.last_path == mode
        torch.testing.assert_close(latents, eager.run(plan, inputs), rtol=1e-5, atol=1e-5)
    assert len(loop._graphs) == 1


# ---- the ControlNet step window (control_guidance_start / _end) ---------------------------------

def _diffusers_keep(num_steps, start, end):
    """diffusers' StableDiffusionXLControlNetPipeline: controlnet_keep[i] (1.0 runs it at full scale)."""
    return [1.0 - float(i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


def test_control_window_is_diffusers_keep():
    from runtime.control_window import control_window

    for steps in (1, 3, 4, 7, 10, 30):
        for start, end in ((0.0, 1.0), (0.0, 0.5), (0.0, 0.6), (0.25, 1.0), (0.3, 0.7), (0.9, 1.0), (0.0, 0.05)):
            window = control_window(steps, start, end)
            keep = _diffusers_keep(steps, start, end)
            assert (window is None) == all(keep) and (window is None or list(map(float, window)) == keep)
    for start, end in ((0.5, 0.5), (0.6, 0.4), (-0.1, 1.0), (0.0, 1.1)):
        with pytest.raises(ValueError, match="control_guidance_start < control_guidance_end"):
            control_window(4, start, end)


class _Counting(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)


def _windowed_reference(name, steps, cond, start, end, cn_scale=0.4):
    """The baseline loop with diffusers' window: the ControlNet scaled by keep[i] (0 off the window)."""
    sched = make_scheduler(SCHEDULER_CONFIG, name)
    sched.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(3)
    latents = torch.randn((1, 4, 8, 8), generator=generator) * sched.init_noise_sigma
    unet, controlnet, keep = ToyUNet(), ToyControlNet(), _diffusers_keep(steps, start, end)
    for i, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        t1 = t.reshape(1).float()
        down, mid = controlnet(model_in, t1, cond["ip_tokens"], cond["control_image"], cond["text_embeds"],
                               cond["time_ids"], torch.tensor([cn_scale * keep[i]]))
        noise = unet(model_in, t1, cond["text_tokens"], cond["ip_tokens"], torch.full((4,), 0.7),
                     cond["text_embeds"], cond["time_ids"], down, mid)
        uncond, positive = noise.chunk(2)
        latents = sched.step(uncond + 5.0 * (positive - uncond), t, latents, generator=generator,
                             return_dict=False)[0]
    return latents


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("start,end", [(0.0, 0.5), (0.25, 1.0), (0.3, 0.7), (0.9, 1.0), (0.0, 1.0)])
def test_eager_window_equals_diffusers_and_runs_the_controlnet_only_inside(name, start, end):
    from runtime.control_window import control_window

    unet, controlnet = _sessions()
    controlnet.module = counter = _Counting(controlnet.module)
    cond = _conditioning(1)
    plan, inputs = _inputs(name, 5, 1, 5.0, 0.7, 0.4, 3, cond)
    inputs.controlnet_steps = control_window(5, start, end)
    latents = DenoiseLoop(unet, controlnet).run(plan, inputs)
    torch.testing.assert_close(latents, _windowed_reference(name, 5, cond, start, end), rtol=1e-5, atol=1e-5)
    assert counter.calls == sum(_diffusers_keep(5, start, end))


def test_a_window_of_another_length_is_refused():
    unet, controlnet = _sessions()
    plan, inputs = _inputs("euler", 4, 1, 5.0, 0.5, 0.5, 0, _conditioning(1))
    inputs.controlnet_steps = (True, False)
    with pytest.raises(ValueError, match="controlnet_steps has 2 entries for 4 steps"):
        DenoiseLoop(unet, controlnet).run(plan, inputs)


def _named_world(flavour="tensorrt"):
    """tests/test_trt_contract.py's World (TensorRT and CUDA doubles), its sessions' dynamic axes named as the
    engines' manifests name them, so the eager loop can size zero residuals off the window."""
    from runtime.trt import TrtSession
    from tests.test_trt_contract import World, _infos

    names = {"sample": ("2B", 4, "latent_height", "latent_width"), "control_image": ("2B", 3, "height", "width"),
             "down_residual_0": ("2B", 4, "latent_height", "latent_width"),
             "mid_residual": ("2B", 1, "latent_height", "latent_width")}
    world = World(flavour)
    for attr, engine in (("unet", world.unet_engine), ("controlnet", world.controlnet_engine)):
        inputs, outputs = _infos(engine.spec)
        inputs = [TensorSpec(i.name, i.dtype, names.get(i.name, ("2B",) + tuple(i.shape[1:])) if i.shape[0] != 1
                             or i.name in names else i.shape, min=i.min, max=i.max) for i in inputs]
        setattr(world, attr, TrtSession(engine, world.trt, inputs, outputs, name=attr, device="cpu",
                                        memory=world.memory, cuda=world.cuda))
    return world


def _enqueues(engine, kind):
    return sum(1 for entry in engine.log if entry.kind == kind)


@pytest.mark.parametrize("mode", ["graph", "step-graphs"])
@pytest.mark.parametrize("start,end", [(0.0, 0.5), (0.5, 1.0), (0.3, 0.7), (0.9, 1.0)])
def test_graph_paths_run_the_controlnet_only_inside_the_window(mode, start, end):
    """Against the TensorRT/CUDA doubles: each replay enqueues the ControlNet exactly on the in-window steps,
    equals the eager loop with the same window (zero residuals off it), replays again with the same result
    (the residual buffers zeroed as it leaves the window), and the window keys the graph."""
    from runtime.control_window import control_window
    from tests.test_trt_contract import loop_inputs

    world, reference = _named_world(), _named_world()
    loop, eager = DenoiseLoop(world.unet, world.controlnet, mode=mode), DenoiseLoop(reference.unet,
                                                                                   reference.controlnet, mode="eager")
    steps = 5
    plan, full = loop_inputs("dpmpp_2m", steps, 1, 8, 3)
    window = control_window(steps, start, end)
    windowed = LoopInputs(full.latents, full.step_noise, full.guidance, full.unet_feeds, full.controlnet_feeds,
                          window)
    inside = sum(_diffusers_keep(steps, start, end))
    expected, expected_full = eager.run(plan, windowed), eager.run(plan, full)
    assert _enqueues(reference.controlnet_engine, "eager") == inside + steps
    for inputs, wanted, runs in ((full, expected_full, steps), (windowed, expected, inside),
                                 (windowed, expected, inside), (full, expected_full, steps)):
        before = _enqueues(world.controlnet_engine, "replay")
        latents = loop.run(plan, inputs)
        assert loop.last_path == mode
        assert _enqueues(world.controlnet_engine, "replay") - before == runs
        torch.testing.assert_close(latents, wanted, rtol=0, atol=0)
    assert len(loop._graphs) == 2  # the default window and this one: two keys, each captured once
    assert not torch.equal(expected, expected_full)
    assert all(not context.errors for engine in world.engines() for context in engine.contexts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["graph", "step-graphs"])
@pytest.mark.parametrize("start,end", [(0.0, 0.5), (0.5, 1.0), (0.9, 1.0)])
def test_cuda_graph_window_equals_eager(mode, start, end):
    """torch sessions on CUDA: the captured loop with a ControlNet window equals the eager loop with it."""
    from runtime.control_window import control_window

    device = torch.device("cuda")
    unet, controlnet = _sessions()
    for session in (unet, controlnet):
        session.module.to(device)
        session.device, session.capturable = device, True
    plan = build_scheduler(SCHEDULER_CONFIG, "euler").plan(4, device)
    loop, eager = DenoiseLoop(unet, controlnet, mode=mode), DenoiseLoop(unet, controlnet, mode="eager")
    _, inputs = _inputs("euler", 4, 1, 5.0, 0.7, 0.4, 3, _conditioning(1, 3))
    inputs = _to(inputs, device)
    inputs.controlnet_steps = control_window(4, start, end)
    for _ in range(2):
        latents = loop.run(plan, inputs)
        assert loop.last_path == mode
        torch.testing.assert_close(latents, eager.run(plan, inputs), rtol=1e-5, atol=1e-5)
