"""Shared session fixtures: the tiny model exported to ONNX by the real CLI, in fp32 and fp16.

Loaded for every test module through `pytest_plugins` in conftest.py. Each build runs once per
session (in-process, `python -m export.build --model tiny --stage onnx`); the fp32 build is the
CLI's default tiny path (no --weights: it writes the tiny checkpoints to <out>/weights first),
the fp16 build reuses those weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.tensors import ort_dtype


def run_export_cli(args: list[str]) -> None:
    """`python -m export.build` in-process (tests call it; a non-zero exit fails the test)."""
    from export.build import main

    assert main(args) == 0


def with_torch_programs(build: Path, pipeline: str, out: Path) -> Path:
    """A copy of the ONNX `build` at `out` plus `--stage torch` programs of `pipeline`'s components (real CLI)."""
    import shutil

    shutil.copytree(build, out)
    run_export_cli(["--model", "tiny", "--pipeline", pipeline, "--stage", "torch", "--weights", str(build / "weights"),
                    "--out", str(out)])
    return out


def module_weight(model, name: str):
    """The weight of module `name` of a UNet or CLIP text model (text names may start with 'text_model.')."""
    return model.get_submodule(name if hasattr(model, "text_model") else name.removeprefix("text_model.")).weight


def random_lora_factors(modules: dict, targets: dict[str, list[str]], rank: int, seed: int = 0) -> dict:
    """(target, module) -> (down (rank, in[, k, k]), up (out, rank[, 1, 1])) of small seeded values, for
    the modules named in `targets` (target -> names) of `modules` (target -> model)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for target, names in targets.items():
        for name in names:
            weight = module_weight(modules[target], name)
            down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.3
            up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []), generator=generator) * 0.3
            layers[(target, name)] = (down, up)
    return layers


def export_lora_build(weights: Path, out: Path, loras: list[str]) -> Path:
    """The tiny IP-Adapter build (fp32 ONNX) of `weights`, exported with these `--lora FILE[:SCALE]`s."""
    args = ["--model", "tiny", "--weights", str(weights), "--pipeline", "ip-adapter", "--stage", "onnx",
            "--precision", "fp32", "--out", str(out)]
    for lora in loras:
        args += ["--lora", lora]
    run_export_cli(args)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tmp_path_factory) -> Path:
    """build dir of `--model tiny --stage onnx --precision fp32` (all pipelines) with weights/."""
    out = tmp_path_factory.mktemp("tiny_onnx") / "fp32"
    run_export_cli(["--model", "tiny", "--stage", "onnx", "--precision", "fp32", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_build(request) -> Path:
    """The fp32 tiny build the runtime tests use: $INSTANTRT_TINY_BUILD when it holds a build made by
    `python -m export.build --model tiny --stage onnx --precision fp32` (with its weights/), else
    the session's tiny_onnx_fp32."""
    import os

    reuse = os.environ.get("INSTANTRT_TINY_BUILD")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        return Path(reuse)
    return request.getfixturevalue("tiny_onnx_fp32")


@pytest.fixture(scope="session")
def tiny_onnx_fp16(tiny_onnx_fp32, tmp_path_factory) -> Path:
    """build dir of the same weights exported with `--precision fp16`."""
    out = tmp_path_factory.mktemp("tiny_onnx") / "fp16"
    run_export_cli(["--model", "tiny", "--stage", "onnx", "--precision", "fp16", "--weights",
                    str(tiny_onnx_fp32 / "weights"), "--out", str(out)])
    return out


def ort_session(path: Path):
    """A single-threaded CPU ONNX Runtime session (quiet)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with float feeds cast to each input's dtype (float16 graphs take float16); outputs as float32."""
    cast = {i.name: np.asarray(feeds[i.name]).astype(ort_dtype(i.type)) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return {name: value.astype(np.float32) for name, value in zip(names, session.run(names, cast))}


def diffusers_sdxl_ip_adapter(weights: Path):
    """diffusers' StableDiffusionXLPipeline on the tiny model's files (Euler) + load_ip_adapter (plain
    IP-Adapter and its image encoder from weights/IP-Adapter): the oracle of the IP-Adapter pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from export import loaders
    from export.specs import TINY

    text = loaders.load_text_stack(TINY, weights)
    pipe = StableDiffusionXLPipeline(
        vae=loaders.load_vae(TINY, weights), text_encoder=text.text_encoder, text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer, tokenizer_2=text.tokenizer_2, unet=loaders.load_unet(TINY, weights),
        scheduler=EulerDiscreteScheduler.from_config(loaders.load_scheduler_config(TINY, weights)),
        add_watermarker=False)
    pipe.load_ip_adapter(str(weights / "IP-Adapter"), subfolder="sdxl_models",
                         weight_name="ip-adapter_sdxl_vit-h.safetensors", image_encoder_folder="models/image_encoder")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """‖value − reference‖ / ‖reference‖ in float64."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))
