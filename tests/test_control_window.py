"""The IdentityNet's step window (control_guidance_start / control_guidance_end) on the tiny InstantID build
(ONNX Runtime, fp32) against diffusers' own StableDiffusionXLControlNetPipeline on the same weights.

The oracle is diffusers' pipeline running its own loop, guidance, scheduler and window logic
(`controlnet_keep`): the tiny UNet with diffusers' IP-Adapter attention processors (the baseline's
`attach_adapter`, 16 face tokens) reads prompt_embeds = [text tokens; face tokens], the IdentityNet is a
diffusers ControlNetModel that reads the face tokens only (InstantID), its control image the kps image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.baseline import make_scheduler
from runtime.control_window import control_window

SIZE, STEPS, SEED = 128, 4, 7
TOL = 1e-5
PROMPT = "a photo of a person"


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


@pytest.fixture(scope="module")
def instantid(tiny_build):
    from runtime.pipelines import InstantIDPipeline

    return InstantIDPipeline.from_build(tiny_build, "onnxruntime")


@pytest.fixture(scope="module")
def face():
    """(ArcFace-sized embedding (512,), kps image (128, 128, 3) uint8) of a synthetic face."""
    from runtime.face import draw_kps

    embedding = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    kps = np.array([[44, 52], [84, 52], [64, 74], [48, 96], [80, 96]], dtype=np.float32)
    return embedding, draw_kps(SIZE, SIZE, kps)


@pytest.fixture(scope="module")
def oracle(tiny_build):
    """diffusers' StableDiffusionXLControlNetPipeline over the baseline's modules of the tiny build's weights,
    and the baseline (its face Resampler gives the face tokens)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from benchmarks.pipelines import InstantIDBaseline

    base = InstantIDBaseline("tiny", weights_dir=tiny_build / "weights", device="cpu", dtype=torch.float32)
    tokens = base.resampler.config.num_queries

    class FaceTokenControlNet(ControlNetModel):  # InstantID: the IdentityNet's context is the face tokens only
        def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
            return super().forward(sample, timestep, encoder_hidden_states[:, -tokens:], *args, **kwargs)

    identitynet = FaceTokenControlNet.from_config(base.controlnet.config)
    identitynet.load_state_dict(base.controlnet.state_dict())
    for processor in base.unet.attn_processors.values():  # [text; face] split by the processors' own count
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.num_tokens = [tokens]
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text.text_encoder, text_encoder_2=base.text.text_encoder_2,
        tokenizer=base.text.tokenizer, tokenizer_2=base.text.tokenizer_2, unet=base.unet,
        controlnet=identitynet.eval(), scheduler=make_scheduler(base.scheduler_config, "euler"),
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, base


def _oracle_latents(oracle, face, ip_scale=0.8, controlnet_scale=0.8, **window) -> torch.Tensor:
    from benchmarks.pipelines import control_tensor

    pipe, base = oracle
    embedding, kps_image = face
    tokens, negative_tokens = base.face_tokens(embedding)
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu",
                                                                          do_classifier_free_guidance=True)
    pipe.set_ip_adapter_scale(ip_scale)
    with torch.no_grad():
        return pipe(prompt_embeds=torch.cat([embeds, tokens], 1),
                    negative_prompt_embeds=torch.cat([negative_embeds, negative_tokens], 1),
                    pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                    image=control_tensor(kps_image), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    guidance_scale=5.0, controlnet_conditioning_scale=controlnet_scale,
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **window).images


def _runtime_latents(instantid, face, **fields) -> torch.Tensor:
    embedding, kps_image = face
    fields = {"ip_scale": 0.8, "controlnet_scale": 0.8, **fields}
    return instantid.generate(embedding, kps_image, PROMPT, steps=STEPS, seed=SEED, decode=False, **fields).latents


@pytest.fixture
def controlnet_calls(instantid, monkeypatch):
    """The steps' count of IdentityNet session runs (the loop calls `run` once per step it runs it)."""
    calls = []
    session = instantid.controlnet
    original = session.run
    monkeypatch.setattr(session, "run", lambda feeds: calls.append(1) or original(feeds))
    return calls


@pytest.mark.parametrize("window", [dict(control_guidance_end=0.5), dict(control_guidance_start=0.5),
                                    dict(control_guidance_start=0.25, control_guidance_end=0.75), {}])
def test_window_equals_diffusers_controlnet_pipeline(instantid, face, oracle, controlnet_calls, window):
    latents = _runtime_latents(instantid, face, **window)
    expected = _oracle_latents(oracle, face, **window)
    error = relative_error(latents, expected)
    start, end = window.get("control_guidance_start", 0.0), window.get("control_guidance_end", 1.0)
    keep = [1.0 - float(i / STEPS < start or (i + 1) / STEPS > end) for i in range(STEPS)]  # diffusers'
    print(f"window {start}..{end}: keep {keep}, latents rel {error:.2e}")
    assert error <= TOL, f"window {window}: runtime vs diffusers latents rel {error:.2e}"
    assert len(controlnet_calls) == sum(keep)  # the IdentityNet runs exactly on the in-window steps


def test_window_changes_the_result_and_the_default_is_todays_loop(instantid, face, controlnet_calls):
    """The default window is no window at all (every step, the loop's inputs as before: bit for bit);
    a window changes the latents; the baseline runs the same window."""
    default = _runtime_latents(instantid, face)
    explicit = _runtime_latents(instantid, face, control_guidance_start=0.0, control_guidance_end=1.0)
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)
    assert control_window(STEPS, 0.0, 1.0) is None and len(controlnet_calls) == 2 * STEPS
    windowed = _runtime_latents(instantid, face, control_guidance_end=0.5)
    assert relative_error(windowed, default) > 1e-3


def test_baseline_runs_the_same_window(instantid, face, oracle):
    _, base = oracle
    embedding, kps_image = face
    for window in (dict(control_guidance_start=0.25, control_guidance_end=0.75),):
        expected = base.generate(embedding, kps_image, PROMPT, steps=STEPS, seed=SEED, ip_scale=0.8,
                                 controlnet_scale=0.8, decode=False, **window).latents
        assert relative_error(_runtime_latents(instantid, face, **window), expected) <= TOL


def test_a_window_without_steps_runs_no_controlnet(instantid, face, controlnet_calls):
    """start=0.9 of 4 steps: no step is inside (diffusers runs the ControlNet at scale 0 throughout); the loop
    drops it and equals controlnet_scale=0."""
    latents = _runtime_latents(instantid, face, control_guidance_start=0.9)
    assert controlnet_calls == []
    zero_scale = _runtime_latents(instantid, face, controlnet_scale=0.0)
    assert relative_error(latents, zero_scale) <= TOL


def test_window_is_a_loop_setting_and_checked():
    from runtime.requests import InstantIDRequest, RequestError, loop_settings

    first = loop_settings(InstantIDRequest("p.jpg", "x", control_guidance_end=0.6), 64, 64)
    assert first != loop_settings(InstantIDRequest("p.jpg", "x"), 64, 64)
    assert first == loop_settings(InstantIDRequest("p.jpg", "x", control_guidance_end=0.6), 64, 64)
    with pytest.raises(RequestError, match=r"control_guidance_start \(0.6\) must be below control_guidance_end"):
        InstantIDRequest("p.jpg", "x", control_guidance_start=0.6, control_guidance_end=0.6)
    with pytest.raises(RequestError, match="control_guidance_end=1.2 is outside 0..1"):
        InstantIDRequest("p.jpg", "x", control_guidance_end=1.2)


def test_flops_count_the_window():
    from benchmarks.flops import stage_flops

    full = stage_flops("tiny", "instantid", 128, 128, 1, 10)
    windowed = stage_flops("tiny", "instantid", 128, 128, 1, 10, control_guidance_end=0.6)
    assert (full.controlnet_steps, windowed.controlnet_steps) == (10, 6)
    assert windowed.flops["denoise_loop"] == 10 * full.flops["unet_step"] + 6 * full.flops["controlnet_step"]


def test_control_window_benchmark_writes_its_table(tiny_build, tmp_path):
    import json

    from benchmarks.control_window import main

    assert main(["--build", str(tiny_build), "--ends", "1.0,0.5", "--steps", "4", "--size", "64", "--runs", "1",
                 "--flops-model", "tiny", "--flops-resolution", "128", "--flops-steps", "4", "--out",
                 str(tmp_path)]) == 0
    result = json.loads((tmp_path / "control_window.json").read_text())
    assert [row["controlnet_steps"] for row in result["times"]] == [4, 2]
    assert [row["controlnet_steps"] for row in result["flops"]] == [4, 2] and result["flops"][1]["flops_saved"] > 0
    assert "| 0.5 | 2/4 |" in (tmp_path / "control_window.md").read_text()
