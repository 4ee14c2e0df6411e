"""Runtime pipelines (ONNX Runtime, fp32 tiny build) against the PyTorch baseline, same weights and seed.

Correctness ladder rung 3 (DESIGN.md): final latents ‖Δ‖/‖ref‖ ≤ 1e-3 and decoded images ≥ 40 dB
PSNR, for InstantID and IP-Adapter (plain and Plus), every scheduler, batch 1 and 2, several λ and
ControlNet scales. The tiny build is exported once per session with the export CLI (tests/fixtures_tiny.py); set
INSTANTRT_TINY_BUILD to a directory made by `python -m export.build --model tiny --stage onnx
--precision fp32` (with its `weights/`) to reuse one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = 128          # generation size of the parity runs
FACE_SIZE = 256     # the astronaut's face is too small for YuNet at 128 px: detect at 256, halve the kps
LATENT_TOL = 1e-3
PSNR_MIN = 40.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_build_fp16(request) -> Path:
    """The fp16 tiny build of the same weights (fixtures_tiny.tiny_onnx_fp16, or $INSTANTRT_TINY_BUILD_FP16)."""
    reuse = os.environ.get("INSTANTRT_TINY_BUILD_FP16")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        return Path(reuse)
    return request.getfixturevalue("tiny_onnx_fp16")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def psnr(image: Image.Image, reference: Image.Image) -> float:
    a, b = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def assert_parity(result, expected, what: str) -> None:
    error = relative_error(result.latents, expected.latents)
    scores = [psnr(a, b) for a, b in zip(result.images, expected.images)]
    print(f"{what}: latents rel {error:.2e}, PSNR {', '.join(f'{s:.1f}' for s in scores)} dB")
    assert result.latents.shape == expected.latents.shape
    assert error <= LATENT_TOL, f"{what}: latents differ by {error:.2e} relative"
    assert len(scores) == len(expected.images) and min(scores) >= PSNR_MIN, f"{what}: PSNR {scores}"


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


# ---- InstantID ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instantid(tiny_build):
    from runtime.pipelines import InstantIDPipeline

    return InstantIDPipeline.from_build(tiny_build, "onnxruntime")


@pytest.fixture(scope="module")
def instantid_baseline(tiny_build, instantid):
    from benchmarks.pipelines import InstantIDBaseline

    return InstantIDBaseline("tiny", weights_dir=tiny_build / "weights", face_analyzer=instantid.face_analyzer)


@pytest.fixture(scope="module")
def astronaut_face(instantid):
    """(embedding (512,), kps image (128, 128, 3)) of skimage's astronaut, found by the build's real YuNet."""
    from skimage import data

    from runtime.face import draw_kps

    face = instantid.face_analyzer.analyze(_resize(data.astronaut(), FACE_SIZE))
    return face.embedding, draw_kps(SIZE, SIZE, face.kps * (SIZE / FACE_SIZE))


@pytest.mark.parametrize("scheduler,num_images,ip_scale,controlnet_scale,negative", [
    ("euler", 1, 0.8, 0.8, None),
    ("dpmpp_2m", 2, 0.3, 0.4, "blurry, low quality"),
    ("euler_a", 2, 0.8, 0.8, None),
    ("dpmpp_2m_karras", 1, 0.8, 0.8, None),
    ("ddim", 1, 0.5, 0.6, None),
    ("lcm", 2, 0.8, 0.8, None),
])
def test_instantid_matches_baseline(instantid, instantid_baseline, astronaut_face, scheduler, num_images,
                                    ip_scale, controlnet_scale, negative):
    embedding, kps_image = astronaut_face
    kwargs = dict(steps=3, guidance=5.0, ip_scale=ip_scale, controlnet_scale=controlnet_scale, seed=7,
                  num_images=num_images, scheduler=scheduler)
    result = instantid.generate(embedding, kps_image, "a photo of a person", negative, **kwargs)
    expected = instantid_baseline.generate(embedding, kps_image, "a photo of a person", negative, **kwargs)
    assert_parity(result, expected, f"instantid {scheduler} x{num_images} λ={ip_scale} cn={controlnet_scale}")


def test_instantid_from_photos_matches_baseline(instantid, instantid_baseline):
    """Whole request from photos (identity: astronaut; pose: the mirrored astronaut), same face analyzer."""
    from skimage import data

    photo = data.astronaut()
    pose = np.ascontiguousarray(photo[:, ::-1])
    kwargs = dict(steps=2, seed=3, width=FACE_SIZE, height=FACE_SIZE, pose_image=pose)
    result = instantid(photo, "a person", return_latents=True, **kwargs)
    expected = instantid_baseline(photo, "a person", **kwargs)
    assert_parity(result, expected, "instantid __call__ with pose photo")
    assert result.images[0].size == (FACE_SIZE, FACE_SIZE)


def test_instantid_scales_change_without_rebuild(instantid, astronaut_face):
    embedding, kps_image = astronaut_face
    runs = [instantid.generate(embedding, kps_image, "a person", steps=2, ip_scale=ip, controlnet_scale=cn,
                               decode=False).latents for ip, cn in ((0.8, 0.8), (0.0, 0.8), (0.8, 0.0))]
    assert not torch.allclose(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    per_layer = [0.8] * instantid.unet.input("ip_scale").shape[0]
    same = instantid.generate(embedding, kps_image, "a person", steps=2, ip_scale=per_layer, decode=False).latents
    torch.testing.assert_close(same, runs[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one value per layer"):
        instantid.generate(embedding, kps_image, "a person", steps=1, ip_scale=[0.5, 0.5], decode=False)


def torch_session(component):
    """A TorchSession over an export.components wrapper (the engine's I/O, run by torch)."""
    from runtime.sessions import TorchSession

    return TorchSession(component.module, component.inputs, component.outputs, name=component.name)


def test_torch_sessions_serve_the_pipeline(tiny_build, astronaut_face, instantid):
    """UNet and ControlNet as torch modules (how the loop runs on a GPU without TensorRT) = ONNX Runtime."""
    from export.sources import Sources
    from export.specs import get_spec
    from runtime.pipelines import InstantIDPipeline

    sources = Sources(get_spec("tiny"), tiny_build / "weights", False, torch.float32, tiny_build / "unused_assets")
    sessions = {name: torch_session(sources.make(name)) for name in ("unet_instantid", "controlnet")}
    pipe = InstantIDPipeline.from_build(tiny_build, "onnxruntime", sessions=sessions,
                                        face_analyzer=instantid.face_analyzer)
    assert pipe.unet is sessions["unet_instantid"] and pipe.controlnet is sessions["controlnet"]
    embedding, kps_image = astronaut_face
    kwargs = dict(steps=2, seed=5, num_images=2, scheduler="dpmpp_2m")
    result = pipe.generate(embedding, kps_image, "a person", **kwargs)
    expected = instantid.generate(embedding, kps_image, "a person", **kwargs)
    assert_parity(result, expected, "instantid torch sessions vs onnxruntime")
    assert pipe.loop.last_path == "eager"


def test_face_models_run_through_sessions(tiny_build, instantid):
    """The face detector and ArcFace behind runtime Sessions (how TensorRT engines serve them) find the same face."""
    from skimage import data

    from runtime.sessions import open_session

    photo = _resize(data.astronaut(), FACE_SIZE)
    expected = instantid.face_analyzer.analyze(photo)
    analyzer = instantid.assets.face_analyzer()
    analyzer.detector.session = open_session(tiny_build, "face_detector", "onnxruntime")
    analyzer.recognizer.session = open_session(tiny_build, "arcface", "onnxruntime")
    face = analyzer.analyze(photo)
    np.testing.assert_allclose(face.kps, expected.kps, atol=1e-4)
    np.testing.assert_allclose(face.embedding, expected.embedding, rtol=1e-5, atol=1e-5)


def test_face_analysis_on_the_device_path_equals_the_host_path(tiny_build, instantid):
    """face_on_device=True (what a GPU pipeline does): the FaceAnalyzer over the build's sessions on the
    pipeline's device finds the same face as the one over the build's assets, and the request gives the
    same image."""
    from skimage import data

    from runtime.face import FaceAnalyzer
    from runtime.pipelines import InstantIDPipeline

    pipe = InstantIDPipeline.from_build(tiny_build, "onnxruntime", face_on_device=True)
    assert isinstance(pipe.face_analyzer, FaceAnalyzer) and not instantid.face_on_device
    photo = _resize(data.astronaut(), FACE_SIZE)
    face, expected = pipe.face_analyzer.analyze(photo), instantid.face_analyzer.analyze(photo)
    kps_error = float(np.abs(face.kps - expected.kps).max())
    cosine = float(face.embedding @ expected.embedding / np.linalg.norm(face.embedding) /
                   np.linalg.norm(expected.embedding))
    print(f"device vs host face analysis: kps {kps_error:.3f} px, embedding cosine {cosine:.6f}")
    assert kps_error <= 0.05 and cosine >= 0.999
    kwargs = dict(steps=2, seed=3, width=FACE_SIZE, height=FACE_SIZE)
    assert_parity(pipe(photo, "a person", return_latents=True, **kwargs),
                  instantid(photo, "a person", return_latents=True, **kwargs), "instantid with device face analysis")


class CountingSession:
    """A session that counts its calls (delegates everything else)."""

    def __init__(self, session):
        self.session, self.calls, self.rows = session, 0, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, feeds):
        self.calls += 1
        self.rows.append(feeds["sample"].shape[0])
        self.feeds = feeds
        return self.session.run(feeds)


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_stacked_requests_equal_their_own_calls(instantid, astronaut_face, scheduler):
    """Three requests (own prompt, pose, identity, seed, num_images) in ONE loop = each on its own."""
    from runtime.pipelines import control_tensor

    embedding, kps_image = astronaut_face
    mirrored = np.ascontiguousarray(kps_image[:, ::-1])
    common = dict(steps=3, guidance=5.0, ip_scale=0.7, controlnet_scale=0.6, scheduler=scheduler)
    requests = [instantid.prepare_embedding(embedding, kps_image, "a person", seed=1, **common),
                instantid.prepare_embedding(embedding[::-1].copy(), mirrored, "an oil painting", "blurry", seed=7,
                                            num_images=2, **common),
                instantid.prepare_embedding(embedding, mirrored, "a person", seed=1, **common)]
    alone = [instantid.run([r])[0] for r in requests]
    loop = instantid.loop
    sessions = loop.unet, loop.controlnet
    loop.unet, loop.controlnet = CountingSession(loop.unet), CountingSession(loop.controlnet)
    try:
        stacked = instantid.run(requests)
        counted, control = loop.unet, loop.controlnet.feeds["control_image"]
    finally:
        loop.unet, loop.controlnet = sessions
    assert counted.calls == 3 and counted.rows == [2 * 4] * 3  # one loop: 3 steps over 4 images x CFG
    poses = [control_tensor(k)[0] for k in (kps_image, mirrored, mirrored, mirrored)]
    torch.testing.assert_close(control, torch.stack(poses * 2), rtol=0, atol=0)  # each row its own pose
    for index, (got, expected) in enumerate(zip(stacked, alone)):
        assert_parity(got, expected, f"stacked request {index} ({scheduler}) vs alone")
        assert relative_error(got.latents, expected.latents) <= 1e-5
    assert relative_error(stacked[1].latents[:1], stacked[0].latents) > 1e-2  # its own seed and prompt


def test_stacked_run_keeps_errors_per_request(instantid, astronaut_face):
    from runtime.pipelines import NonFiniteError

    embedding, kps_image = astronaut_face
    good = instantid.prepare_embedding(embedding, kps_image, "a person", steps=2, seed=3)
    broken = instantid.prepare_embedding(np.full(512, np.inf, np.float32), kps_image, "a person", steps=2, seed=3)
    results = instantid.run([broken, good])
    assert isinstance(results[0], NonFiniteError) and "NaN/Inf latents" in str(results[0])
    assert_parity(results[1], instantid.run([good])[0], "the finite neighbour of a NaN request")
    other = instantid.prepare_embedding(embedding, kps_image, "a person", steps=3, seed=3)
    with pytest.raises(ValueError, match="must share size, steps"):
        instantid.run([good, other])
    assert instantid.max_images(good.settings) is None  # ONNX Runtime: any number of rows


def test_no_face_is_a_clear_error(instantid):
    from skimage import data

    from runtime.face import NoFaceError

    with pytest.raises(NoFaceError, match="no face found"):
        instantid(data.chelsea(), "a cat", steps=1, width=SIZE, height=SIZE)


# ---- IP-Adapter -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[False, True], ids=["plain", "plus"])
def ip_pair(request, tiny_build):
    from benchmarks.pipelines import IPAdapterBaseline
    from runtime.pipelines import IPAdapterPipeline

    plus = request.param
    return (IPAdapterPipeline.from_build(tiny_build, "onnxruntime", plus=plus),
            IPAdapterBaseline("tiny", plus=plus, weights_dir=tiny_build / "weights"))


@pytest.mark.parametrize("scheduler,num_images,ip_scale,negative,guidance", [
    ("euler", 1, 0.6, None, 5.0),
    ("ddim", 2, 0.9, "blurry", 5.0),
    ("dpmpp_2m_karras", 1, 0.3, None, 5.0),
    ("euler", 2, 0.6, None, 1.0),  # guidance 1: no CFG rows
    ("lcm", 2, 0.6, None, 1.5),
    ("euler_a", 1, 0.6, "blurry", 5.0),
    ("dpmpp_2m", 1, 0.6, None, 5.0),
])
def test_ip_adapter_matches_baseline(ip_pair, scheduler, num_images, ip_scale, negative, guidance):
    from skimage import data

    pipe, baseline = ip_pair
    kwargs = dict(steps=3, guidance=guidance, ip_scale=ip_scale, seed=11, width=SIZE, height=SIZE,
                  num_images=num_images, scheduler=scheduler)
    result = pipe(data.coffee(), "a cup on a table", negative, return_latents=True, **kwargs)
    expected = baseline(data.coffee(), "a cup on a table", negative, **kwargs)
    assert_parity(result, expected,
                  f"ip-adapter{' plus' if pipe.plus else ''} {scheduler} x{num_images} λ={ip_scale} cfg={guidance}")


def test_ip_adapter_stacked_requests_equal_their_own_calls(ip_pair):
    from skimage import data

    pipe, _ = ip_pair
    common = dict(steps=2, width=SIZE, height=SIZE, scheduler="euler_a")
    requests = [pipe.prepare(data.coffee(), "a cup", seed=2, **common),
                pipe.prepare(data.astronaut(), "a portrait", "blurry", seed=5, num_images=2, **common)]
    stacked = pipe.run(requests)
    for index, request in enumerate(requests):
        expected = pipe.run([request])[0]
        assert_parity(stacked[index], expected, f"ip-adapter{' plus' if pipe.plus else ''} stacked request {index}")
        assert relative_error(stacked[index].latents, expected.latents) <= 1e-5


# ---- errors and caches ----------------------------------------------------------------------------

def test_size_errors(ip_pair):
    from skimage import data

    from runtime.pipelines import ResolutionError

    pipe = ip_pair[0]
    with pytest.raises(ResolutionError, match="not a multiple of 64 px.*e.g. to 128x128"):
        pipe(data.coffee(), "x", steps=1, width=100, height=128)
    pipe.size_limits = ((2, 4, 8, 8), (8, 4, 24, 24))  # what a TensorRT profile of 64..192 px records
    try:
        with pytest.raises(ResolutionError, match=r"outside the engine profile.*width 64..192, height 64..192 px"):
            pipe(data.coffee(), "x", steps=1, width=256, height=128)
        with pytest.raises(ResolutionError, match="rows .* outside the engine profile 2..8"):
            pipe(data.coffee(), "x", steps=1, width=SIZE, height=SIZE, num_images=5)
    finally:
        pipe.size_limits = None


def test_engine_range_from_the_manifest(tiny_build):
    import dataclasses

    from engine.manifest import load_manifest
    from engine.tensors import TensorSpec
    from runtime.assets import Assets

    manifest = load_manifest(tiny_build)
    assets = Assets.open(tiny_build, manifest)
    assert assets.engine_range("unet_instantid") is None or manifest.components["unet_instantid"].engine
    fake = type("Record", (), {"inputs": (TensorSpec("sample", "float32", ("2B", 4, "latent_height",
                                                                               "latent_width"), (2, 4, 8, 8),
                                                       (2, 4, 16, 16), (8, 4, 24, 24)),)})()
    copy = dataclasses.replace(manifest.components["unet_instantid"], engine=fake)
    assets.manifest = dataclasses.replace(manifest, components={**manifest.components, "unet_instantid": copy})
    assert assets.engine_range("unet_instantid") == ((2, 4, 8, 8), (8, 4, 24, 24))


def test_tensorrt_backend_without_engines_says_how_to_build(tiny_build, tmp_path):
    from runtime.pipelines import IPAdapterPipeline
    from runtime.sessions import SessionError

    manifest = (tiny_build / "manifest.json").read_text()
    if '"engine": {' in manifest:
        pytest.skip("this build has engines")
    with pytest.raises(SessionError, match="has no engine; build it: python -m export.build .* --stage engines"):
        IPAdapterPipeline.from_build(tiny_build, "tensorrt-rtx")


def test_nan_output_raises(ip_pair):
    from skimage import data

    from runtime.pipelines import NonFiniteError

    pipe = ip_pair[0]
    unet = pipe.loop.unet

    class NaNUNet:
        def __getattr__(self, name):
            return getattr(unet, name)

        def run(self, feeds):
            return {"noise_pred": torch.full_like(feeds["sample"], float("nan"))}

    pipe.loop.unet = NaNUNet()
    try:
        with pytest.raises(NonFiniteError, match="NaN/Inf latents"):
            pipe(data.coffee(), "x", steps=1, width=SIZE, height=SIZE)
    finally:
        pipe.loop.unet = unet
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN"):
        pipe.decode(torch.full((1, 4, 16, 16), float("nan")))


def test_prompt_encodings_are_cached(ip_pair):
    from runtime.pipelines import PROMPT_CACHE_SIZE

    pipe = ip_pair[0]
    first = pipe.encode_prompt("a red apple")
    assert pipe.encode_prompt("a red apple") is first
    assert first[0].shape[:2] == (1, 77) and first[1].ndim == 2
    for i in range(PROMPT_CACHE_SIZE):
        pipe.encode_prompt(f"prompt {i}")
    assert "a red apple" not in pipe.prompts and len(pipe.prompts) == PROMPT_CACHE_SIZE


def test_cli_generates_and_reports_errors(tiny_build, tmp_path, capsys):
    from skimage import data

    from runtime.__main__ import main

    photo, cat = tmp_path / "astronaut.png", tmp_path / "cat.png"
    Image.fromarray(data.astronaut()).save(photo)
    Image.fromarray(data.chelsea()).save(cat)
    out = tmp_path / "out.png"
    common = ["--build", str(tiny_build), "--prompt", "a person", "--steps", "1", "--width", str(FACE_SIZE),
              "--height", str(FACE_SIZE)]
    sheet = tmp_path / "sheet.png"
    assert main(["generate", "--face", str(photo), "--out", str(out), "--num-images", "2", "--sheet", str(sheet),
                 *common]) == 0
    assert [Image.open(tmp_path / f"out-{i}.png").size for i in range(2)] == [(FACE_SIZE, FACE_SIZE)] * 2
    from runtime.face.sheet import CAPTION_HEIGHT, GAP, PANEL_HEIGHT
    # four square panels (photo 512², kps image and output FACE_SIZE², crop 112²), each PANEL_HEIGHT tall
    assert Image.open(sheet).size == (4 * PANEL_HEIGHT + 5 * GAP, PANEL_HEIGHT + CAPTION_HEIGHT + 2 * GAP)
    last = PANEL_HEIGHT * 3 + GAP * 4  # the fourth panel is the first output, scaled
    expected = np.asarray(Image.open(tmp_path / "out-0.png").convert("RGB").resize((PANEL_HEIGHT, PANEL_HEIGHT),
                                                                                   Image.LANCZOS if FACE_SIZE >
                                                                                   PANEL_HEIGHT else Image.NEAREST))
    assert np.array_equal(np.asarray(Image.open(sheet))[GAP:GAP + PANEL_HEIGHT, last:last + PANEL_HEIGHT], expected)
    assert main(["generate", "--face", str(cat), "--out", str(out), *common]) == 2
    assert "no face found" in capsys.readouterr().err
    assert main(["generate", "--pipeline", "ip-adapter-plus", "--image", str(cat), "--out", str(out), "--sheet",
                 str(sheet), *common]) == 2
    assert "--sheet shows the face analysis of an InstantID request" in capsys.readouterr().err
    assert main(["generate", "--pipeline", "ip-adapter-plus", "--image", str(cat), "--out", str(out), *common]) == 0
    assert Image.open(out).size == (FACE_SIZE, FACE_SIZE)


def test_fp16_graphs_stay_close_to_fp32(tiny_build_fp16, instantid, astronaut_face):
    """The same pipeline over the fp16 build (fp16 UNet/ControlNet, fp32 VAE and face models): fp32 latents."""
    from runtime.pipelines import InstantIDPipeline

    pipe = InstantIDPipeline.from_build(tiny_build_fp16, "onnxruntime", face_analyzer=instantid.face_analyzer)
    assert pipe.unet.input("sample").dtype == torch.float16
    embedding, kps_image = astronaut_face
    kwargs = dict(steps=3, seed=1, num_images=2)
    result = pipe.generate(embedding, kps_image, "a person", **kwargs)
    expected = instantid.generate(embedding, kps_image, "a person", **kwargs)
    error = relative_error(result.latents, expected.latents)
    scores = [psnr(a, b) for a, b in zip(result.images, expected.images)]
    print(f"instantid fp16 build vs fp32 build: latents rel {error:.2e}, PSNR {scores}")
    assert result.latents.dtype == torch.float32 and error <= 1e-2 and min(scores) >= 35.0
