"""The PyTorch baseline pipelines: reference data flow, determinism, batching (tiny model, CPU, fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.pipelines import InstantIDBaseline, IPAdapterBaseline

STEPS = 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference_image() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((160, 160))


@pytest.fixture(scope="module")
def instantid(tiny_weights):
    return InstantIDBaseline("tiny", weights_dir=tiny_weights)


def _diffusers_ip_pipeline(tiny_weights, weight_name: str, baseline: IPAdapterBaseline):
    """diffusers' own SDXL pipeline + load_ip_adapter on the same tiny files: the reference."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from export import loaders
    from export.specs import TINY

    text = loaders.load_text_stack(TINY, tiny_weights)
    pipe = StableDiffusionXLPipeline(
        vae=loaders.load_vae(TINY, tiny_weights), text_encoder=text.text_encoder,
        text_encoder_2=text.text_encoder_2, tokenizer=text.tokenizer, tokenizer_2=text.tokenizer_2,
        unet=loaders.load_unet(TINY, tiny_weights),
        scheduler=EulerDiscreteScheduler.from_config(baseline.scheduler_config), add_watermarker=False)
    pipe.load_ip_adapter(str(tiny_weights / "IP-Adapter"), subfolder="sdxl_models", weight_name=weight_name,
                         image_encoder_folder="models/image_encoder")
    return pipe


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_ip_adapter_baseline_equals_diffusers_pipeline(tiny_weights, reference_image, plus):
    baseline = IPAdapterBaseline("tiny", plus=plus, weights_dir=tiny_weights)
    ours = baseline(reference_image, "a portrait, oil painting", negative_prompt="blurry", steps=STEPS,
                    guidance=5.0, ip_scale=0.6, seed=7, width=128, height=128, num_images=2, decode=False)
    name = "ip-adapter-plus_sdxl_vit-h.safetensors" if plus else "ip-adapter_sdxl_vit-h.safetensors"
    pipe = _diffusers_ip_pipeline(tiny_weights, name, baseline)
    pipe.set_ip_adapter_scale(0.6)
    want = pipe("a portrait, oil painting", negative_prompt="blurry", ip_adapter_image=reference_image,
                num_inference_steps=STEPS, guidance_scale=5.0, height=128, width=128, num_images_per_prompt=2,
                generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert ours.latents.shape == (2, 4, 16, 16)
    assert rel(ours.latents, want) < 1e-5


def _kps_image(size=128):
    from runtime.face import draw_kps

    kps = np.array([[44, 50], [84, 50], [64, 70], [48, 92], [80, 92]], np.float32) * size / 128
    return draw_kps(size, size, kps)


def test_instantid_is_deterministic_and_batches(instantid):
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32) * 20
    kwargs = dict(steps=STEPS, seed=3, num_images=2, decode=False)
    first = instantid.generate(embedding, _kps_image(), "a person", **kwargs).latents
    again = instantid.generate(embedding, _kps_image(), "a person", **kwargs).latents
    other_seed = instantid.generate(embedding, _kps_image(), "a person", **{**kwargs, "seed": 4}).latents
    assert torch.equal(first, again)
    assert first.shape == (2, 4, 16, 16) and torch.isfinite(first).all()
    assert rel(first[0], first[1]) > 0.1  # two images, two noises
    assert rel(first, other_seed) > 0.1


def test_instantid_scales_reach_the_model(instantid):
    embedding = np.random.default_rng(1).standard_normal(512).astype(np.float32) * 20
    run = lambda **kw: instantid.generate(embedding, _kps_image(), "a person", steps=STEPS, seed=1,
                                          decode=False, **kw).latents
    base = run(ip_scale=0.8, controlnet_scale=0.8)
    assert rel(run(ip_scale=0.0, controlnet_scale=0.8), base) > 1e-3
    assert rel(run(ip_scale=0.8, controlnet_scale=0.0), base) > 1e-3
    per_layer = [0.8] * len(instantid.ip_layers)
    assert torch.equal(run(ip_scale=per_layer, controlnet_scale=0.8), base)


def test_instantid_controlnet_scale_zero_is_the_plain_adapter_loop(instantid):
    """With conditioning scale 0 the IdentityNet residuals vanish: same as running without it."""
    embedding = np.random.default_rng(2).standard_normal(512).astype(np.float32) * 20
    tokens, negative_tokens = instantid.face_tokens(embedding)
    embeds, pooled, negative_embeds, negative_pooled = instantid.encode_prompt("a person", None)
    common = dict(prompt_embeds=embeds, pooled=pooled, negative_embeds=negative_embeds,
                  negative_pooled=negative_pooled, tokens=tokens, negative_tokens=negative_tokens, height=128,
                  width=128, num_images=1, steps=STEPS, guidance=5.0, ip_scale=0.8, seed=5)
    without = instantid.denoise(**common)
    from benchmarks.pipelines import control_tensor

    with_zero = instantid.denoise(**common, controlnet=instantid.controlnet,
                                  control_image=control_tensor(_kps_image()), controlnet_scale=0.0)
    assert rel(with_zero, without) < 1e-6


def test_negative_face_tokens_are_the_resampler_of_zeros(instantid):
    _, negative = instantid.face_tokens(np.ones(512, np.float32))
    with torch.no_grad():
        want = instantid.resampler(torch.zeros(1, 1, 512))
    assert torch.allclose(negative, want)
    assert negative.abs().sum() > 0  # not zero tokens


def test_diffusers_projectors_equal_the_exported_ones(tiny_weights, instantid):
    """The baseline's diffusers projectors (IPAdapterPlusImageProjection for InstantID's face Resampler
    and IP-Adapter Plus, ImageProjection for plain) read from the real files equal export.adapters'
    Resampler / ImageProj, the modules the exporter traces, to float rounding."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    from export import loaders
    from export.specs import TINY

    generator = torch.Generator().manual_seed(3)
    exported, _ = loaders.load_instantid_adapter(TINY, None, tiny_weights)
    face = torch.randn(3, 1, 512, generator=generator) * 20
    assert isinstance(instantid.resampler, IPAdapterPlusImageProjection)
    with torch.no_grad():
        got, want = instantid.resampler(face), exported(face)
    assert got.shape == (3, 16, TINY.cross_attention_dim) and rel(got, want) < 1e-6
    for plus, cls, shape in ((False, ImageProjection, (3, TINY.ip_image_proj.embed_dim)),
                             (True, IPAdapterPlusImageProjection, (3, 257, TINY.ip_plus_resampler.embedding_dim))):
        baseline = IPAdapterBaseline("tiny", plus=plus, weights_dir=tiny_weights)
        exported, _ = loaders.load_ip_adapter(TINY, None, plus, tiny_weights)
        embeds = torch.randn(*shape, generator=generator)
        assert isinstance(baseline.projector, cls)
        with torch.no_grad():
            got, want = baseline.projector(embeds), exported(embeds)
        assert got.shape == want.shape and rel(got, want) < 1e-6


def test_instantid_decodes_images(instantid):
    result = instantid.generate(np.ones(512, np.float32), _kps_image(), "a person", steps=2, num_images=2)
    assert [image.size for image in result.images] == [(128, 128), (128, 128)]
    assert all(image.mode == "RGB" for image in result.images)


def test_instantid_from_a_photo_with_a_real_detector(tiny_weights):
    """Astronaut photo -> real YuNet -> kps + (stand-in) ArcFace embedding -> image; chelsea has no face."""
    from skimage import data

    from runtime.face import FaceAnalyzer, NoFaceError

    analyzer = FaceAnalyzer.from_folder(tiny_weights / "antelopev2", detector="yunet")
    pipe = InstantIDBaseline("tiny", weights_dir=tiny_weights, face_analyzer=analyzer)
    result = pipe(data.astronaut(), "a person", steps=2, width=256, height=256, num_images=2)
    assert [image.size for image in result.images] == [(256, 256)] * 2
    # the face is found on the photo at InstantID's detection size (1280 x 1280), whatever the output size
    from runtime.images import resize_for_instantid

    face = analyzer.analyze(resize_for_instantid(data.astronaut()))
    assert face.embedding.shape == (512,)
    # the same face through generate() gives the same latents: __call__ adds only the face analysis
    from runtime.face import draw_kps

    kps_image = draw_kps(256, 256, (face.kps * 0.2).astype(np.float32))  # 1280 -> 256, same aspect
    direct = pipe.generate(face.embedding, kps_image, "a person", steps=2, num_images=2, decode=False)
    assert torch.equal(direct.latents, result.latents)
    with pytest.raises(NoFaceError, match="no face found"):
        pipe(data.chelsea(), "a cat", steps=1, width=128, height=128)


def test_baseline_knows_every_runtime_scheduler():
    """Every name the CLI and the server accept has its diffusers class in the baseline, with the same
    first timesteps (the presets' spacing) for a 4-step plan."""
    from benchmarks.baseline import SCHEDULERS as BASELINE, make_scheduler
    from export.specs import SCHEDULER_CONFIG
    from runtime.schedulers import SCHEDULERS, build_scheduler

    assert set(BASELINE) == set(SCHEDULERS)
    for name in SCHEDULERS:
        reference = make_scheduler(dict(SCHEDULER_CONFIG), name)
        reference.set_timesteps(4)
        ours = build_scheduler(dict(SCHEDULER_CONFIG), name).plan(4)
        assert [int(t) for t in reference.timesteps] == [int(t) for t in ours.timesteps], name
