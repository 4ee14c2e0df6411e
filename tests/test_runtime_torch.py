"""The torch backend: `python -m export.build --stage torch` writes torch.export programs, and the
runtime serves a pipeline from them alone (no diffusers, no transformers, no checkpoint) with the
results of the ONNX Runtime backend on the same weights."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_tiny import with_torch_programs

REPO = Path(__file__).resolve().parents[1]
INSTANTID = ["text_encoder", "text_encoder_2", "face_proj", "controlnet", "unet_instantid", "vae_decoder"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_build(tiny_onnx_fp32, tmp_path_factory) -> Path:
    """A copy of the fp32 tiny build plus `--stage torch` programs of InstantID's model components."""
    return with_torch_programs(tiny_onnx_fp32, "instantid", tmp_path_factory.mktemp("tiny_torch") / "tiny")


def test_torch_stage_writes_programs_and_records_them(torch_build):
    manifest = json.loads((torch_build / "manifest.json").read_text())
    programs = manifest["metadata"]["torch_programs"]
    assert sorted(programs) == sorted(INSTANTID)  # the face models stay ONNX
    unet = programs["unet_instantid"]
    assert (torch_build / unet["path"]).is_file() and unet["size_bytes"] > 1e6 and len(unet["sha256"]) == 64
    assert [name for name, _, _ in unet["inputs"][:3]] == ["sample", "timestep", "text_tokens"]
    assert unet["inputs"][0][2] == ["2B", 4, "latent_height", "latent_width"]
    assert manifest["components"]["unet_instantid"]["onnx"] is not None  # the ONNX export is untouched


def test_dynamic_axes_map_to_64_pixel_units():
    from engine.tensors import TensorSpec
    from export.components import Component
    from export.torch_programs import dynamic_shapes

    class Forward(torch.nn.Module):
        def forward(self, sample, *residuals):
            return sample

    component = Component("x", Forward(), (TensorSpec("sample", torch.float32, ("2B", 4, "latent_height", "latent_width")),
                                           TensorSpec("down_residual_0", torch.float32,
                                                      ("2B", 8, "latent_height/2", "latent_width/2"))), ())
    sample, residuals = dynamic_shapes(component)  # forward(sample, *residuals): residuals grouped
    assert sorted(sample) == [0, 2, 3] and str(sample[0]) == "2*batch"
    assert str(sample[2]) == "8*height_units" and str(residuals[0][3]) == "4*width_units"


@pytest.mark.parametrize("size,num_images,scheduler", [((256, 256), 2, "dpmpp_2m"), ((320, 192), 1, "euler_a")])
def test_torch_backend_equals_onnxruntime(torch_build, size, num_images, scheduler):
    """Whole InstantID requests from the astronaut photo, at the trace size and off it."""
    from skimage import data

    from runtime.pipelines import InstantIDPipeline

    ort = InstantIDPipeline.from_build(torch_build, "onnxruntime")
    pipe = InstantIDPipeline.from_build(torch_build, "torch", device="cpu", face_analyzer=ort.face_analyzer,
                                        trust_programs=True)
    assert type(pipe.unet).__name__ == "TorchSession" and pipe.device.type == "cpu"
    width, height = size
    kwargs = dict(steps=3, seed=4, width=width, height=height, num_images=num_images, scheduler=scheduler)
    expected = ort(data.astronaut(), "a person", return_latents=True, **kwargs)
    result = pipe(data.astronaut(), "a person", return_latents=True, **kwargs)
    error = float((result.latents - expected.latents).norm() / expected.latents.norm())
    pixels = max(int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max())
                 for a, b in zip(result.images, expected.images))
    print(f"torch vs onnxruntime {width}x{height} x{num_images} {scheduler}: latents rel {error:.2e}, "
          f"max pixel diff {pixels}")
    assert result.latents.shape == (num_images, 4, height // 8, width // 8)
    assert error <= 1e-5 and pixels <= 1


def test_torch_backend_needs_neither_diffusers_nor_transformers(torch_build):
    code = ("import sys; from runtime.pipelines import InstantIDPipeline; "
            f"pipe = InstantIDPipeline.from_build({str(torch_build)!r}, 'torch', trust_programs=True); "
            "pipe.generate(__import__('numpy').ones(512, 'float32'), __import__('numpy').zeros((128, 128, 3), 'uint8'), "
            "'a person', steps=1); "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_missing_or_corrupt_programs_say_how_to_export(torch_build, tmp_path):
    from runtime.sessions import SessionError, open_session

    with pytest.raises(SessionError, match="no torch program for 'image_encoder'.*--stage torch"):
        open_session(torch_build, "image_encoder", "torch", trust_programs=True)
    broken = tmp_path / "broken"
    shutil.copytree(torch_build, broken, ignore=shutil.ignore_patterns("*.onnx", "*.data", "weights"))
    program = broken / "torch" / "face_proj.pt2"
    program.write_bytes(program.read_bytes()[: program.stat().st_size // 2])
    with pytest.raises(SessionError, match="does not match its manifest checksum.*--stage torch"):
        open_session(broken, "face_proj", "torch", trust_programs=True)
    with pytest.raises(SessionError, match="cannot load .*re-export it"):
        open_session(broken, "face_proj", "torch", verify_sha256=False, trust_programs=True)


def test_latency_harness_times_the_builds_programs(torch_build, tmp_path):
    """`benchmarks.latency --backend torch` on a build with programs measures the runtime's torch backend."""
    from benchmarks import latency

    out = tmp_path / "bench"
    argv = ["--build", str(torch_build), "--backend", "torch", "--trust-torch-programs", "--pipeline", "instantid",
            "--steps", "2",
            "--resolution", "128", "--runs", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
            "--out", str(out)]
    assert latency.main(argv) == 0
    result = json.loads((out / "latency.json").read_text())
    torch_run = result["backends"][1]
    assert torch_run["available"], torch_run["reason"]
    assert "the build's torch.export programs (--stage torch)" in torch_run["notes"]
    assert torch_run["latents_rel_to_baseline"] < 1e-3 and torch_run["stages"]["denoise_loop"]["median"] > 0
