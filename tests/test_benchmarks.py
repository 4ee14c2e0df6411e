"""The benchmark harness in a reduced mode: output schema, table, plot, FLOP counts and their scaling.

Tiny model, 64 px, 2 steps, 1 run: the numbers are meaningless, the shapes of the outputs are not.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import flops, latency, report
from benchmarks.stages import STAGES
from benchmarks.timing import summarize

REPO = Path(__file__).resolve().parents[1]
BACKEND_KEYS = {"name", "available", "reason", "device", "load_s", "cold_start_s", "memory", "stages",
                "stage_errors", "latents_rel_to_baseline", "notes", "sweep"}
STATS_KEYS = {"median", "p90", "mean", "min", "max", "runs"}


def test_summarize_median_and_p90():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert stats.median == 5.5 and stats.p90 == 9.0 and stats.min == 1.0 and stats.max == 10.0
    assert summarize([2.0]).p90 == 2.0
    with pytest.raises(ValueError):
        summarize([])


@pytest.mark.parametrize("pipeline", ["instantid", "ip-adapter-plus"])
def test_unet_flops_scale_with_pixels(pipeline):
    """~4x per doubling of the side once the pixel work dominates; at 64 px the tiny UNet's
    resolution-independent work (time embedding, K/V of the 93 context tokens) is still visible."""
    spec = flops.get_spec("tiny")
    counts = {size: flops.unet_step_flops(spec, pipeline, size, size, rows=2) for size in (64, 128, 256)}
    assert counts[64] > 0
    assert 2.5 < counts[128] / counts[64] < 4.6
    assert 3.6 < counts[256] / counts[128] < 4.6
    assert flops.unet_step_flops(spec, pipeline, 64, 64, rows=4) == pytest.approx(2 * counts[64], rel=1e-6)


def test_tiny_stage_flops_are_positive_and_add_up():
    counted = flops.stage_flops("tiny", "instantid", 64, 64, batch=1, steps=2).flops
    assert all(counted[k] > 0 for k in ("text_encoding", "image_tokens", "unet_step", "controlnet_step",
                                         "vae_decode"))
    assert counted["denoise_loop"] == 2 * (counted["unet_step"] + counted["controlnet_step"])
    assert counted["end_to_end"] == pytest.approx(counted["text_encoding"] + counted["image_tokens"]
                                                  + counted["denoise_loop"] + counted["vae_decode"])
    assert flops.stage_flops("tiny", "ip-adapter", 64, 64, steps=2).flops["controlnet_step"] == 0


def test_long_prompts_and_extra_controlnets_add_their_work():
    """A 3-chunk prompt: 3 rows through the text encoders and 231 text keys in every cross-attention; each
    extra ControlNet is one more ControlNet call per in-window step (the IdentityNet's shape with the text
    tokens as context)."""
    spec = flops.get_spec("tiny")
    plain = flops.stage_flops("tiny", "instantid", 64, 64, steps=4).flops
    long = flops.stage_flops("tiny", "instantid", 64, 64, steps=4, text_chunks=3).flops
    assert long["text_encoding"] == pytest.approx(3 * plain["text_encoding"], rel=1e-6)
    assert long["unet_step"] > plain["unet_step"] and long["controlnet_step"] == plain["controlnet_step"]
    extra = flops.extra_controlnet_step_flops(spec, 64, 64, rows=2)
    two = flops.stage_flops("tiny", "instantid", 64, 64, steps=4, controlnets=2, control_guidance_end=0.5)
    assert two.flops["controlnet_step"] == pytest.approx(plain["controlnet_step"] + 2 * extra, rel=1e-6)
    assert two.controlnet_steps == 2
    assert two.flops["denoise_loop"] == pytest.approx(4 * plain["unet_step"] + 2 * two.flops["controlnet_step"])
    only = flops.stage_flops("tiny", "ip-adapter", 64, 64, steps=4, controlnets=1).flops
    assert only["controlnet_step"] == pytest.approx(extra, rel=1e-6)
    with pytest.raises(ValueError, match="text_chunks"):
        flops.stage_flops("tiny", "instantid", 64, 64, text_chunks=0)


@pytest.mark.slow
def test_sdxl_flops_match_reference_numbers():
    """REFERENCE.md: 1024², batch 2: UNet 13.56 TFLOP/step (93 tokens), ControlNet 5.98; VAE decode 10.5."""
    spec = flops.get_spec("sdxl")
    unet = flops.meta_unet(spec, "instantid")
    unet_step = flops.unet_step_flops(spec, "instantid", 1024, 1024, rows=2, unet=unet)
    assert unet_step / 1e12 == pytest.approx(13.56, rel=0.02)
    assert 3.8 < unet_step / flops.unet_step_flops(spec, "instantid", 512, 512, rows=2, unet=unet) < 4.6
    assert flops.controlnet_step_flops(spec, 1024, 1024, rows=2) / 1e12 == pytest.approx(5.98, rel=0.02)
    assert flops.vae_decode_flops(spec, 1024, 1024, batch=1) / 1e12 == pytest.approx(10.5, rel=0.02)


def test_matmul_peak_is_measured():
    peak = flops.measure_matmul_peak("cpu", n=256, repeats=2)
    assert peak.flops_per_s > 1e8 and peak.dtype == "float32"


def _check_result(result: dict, out: Path, backends: list[str]) -> None:
    assert result["schema"] == latency.SCHEMA
    assert {"date", "command", "machine", "config", "stages", "backends", "floor", "ratios", "speedups"} <= set(result)
    assert {"cpu", "cpu_cores", "gpus", "versions"} <= set(result["machine"])
    assert "torch" in result["machine"]["versions"]
    assert result["command"].startswith("python -m benchmarks.latency ")
    assert result["stages"] == list(STAGES)
    assert [b["name"] for b in result["backends"]] == backends
    for backend in result["backends"]:
        assert set(backend) == BACKEND_KEYS
    base = result["backends"][0]
    assert base["available"] and base["cold_start_s"] > 0 and base["memory"]["peak_bytes"] > 0
    for stage in ("text_encoding", "image_tokens", "denoise_step", "denoise_loop", "vae_decode", "end_to_end"):
        assert set(base["stages"][stage]) == STATS_KEYS and base["stages"][stage]["median"] > 0, stage
    floor = result["floor"]
    assert floor["peak"]["flops_per_s"] > 0 and all(floor["flops"][s] > 0 for s in ("unet_step", "end_to_end"))
    assert result["ratios"]["baseline"]["end_to_end"] > 0
    assert json.loads((out / "latency.json").read_text()) == result
    table = (out / "latency.md").read_text()
    for row in list(STAGES) + ["cold start", "peak memory"]:
        assert f"| {row}" in table, row
    assert (out / "latency.png").stat().st_size > 1000


def test_harness_baseline_alone(tmp_path, capsys):
    """No build: the baseline runs, a requested runtime backend is reported unavailable; a line per
    stage of the run on stderr, the Hugging Face loading bars and diffusers' empty notice filtered."""
    out = tmp_path / "out"
    argv = ["--backend", "onnxruntime", "--pipeline", "instantid", "--model", "tiny", "--steps", "2",
            "--resolution", "64", "--runs", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    assert latency.main(argv) == 0
    err = capsys.readouterr().err
    for line in ("baseline: loading...", "baseline: loaded in", "baseline: cold start",
                 "warm-up 0 + 1 runs of 7 stages", "floor: counting FLOPs"):
        assert line in err, err
    assert "should be kept in float32: []" not in err
    result = json.loads((out / "latency.json").read_text())
    _check_result(result, out, ["baseline", "onnxruntime"])
    ort = result["backends"][1]
    assert not ort["available"] and "no --build" in ort["reason"]
    assert "onnxruntime: unavailable: no --build" in (out / "latency.md").read_text()
    assert result["backends"][0]["stages"]["face_analysis"] is None  # no build: no face models


def test_backend_that_cannot_load_is_unavailable_not_a_crash():
    measured, latents = latency.measure_backend("nope", lambda: (_ for _ in ()).throw(ValueError("no such thing")),
                                                None, 1, 0, "cpu")
    assert not measured.available and measured.reason == "ValueError: no such thing" and latents is None
    assert measured.stages == {}


@pytest.mark.slow
def test_harness_baseline_vs_onnxruntime_with_sweep(tiny_build, tmp_path):
    out = tmp_path / "out"
    assert latency.main(["--build", str(tiny_build), "--backend", "onnxruntime,torch-nope", "--out", str(out)]) == 2
    argv = ["--build", str(tiny_build), "--backend", "onnxruntime,tensorrt", "--pipeline", "instantid",
            "--steps", "2", "--resolution", "64", "--runs", "1", "--warmup", "0", "--threads", "1",
            "--sweep-resolution", "64,128", "--sweep-batch", "1", "--out", str(out)]
    assert latency.main(argv) == 0
    result = json.loads((out / "latency.json").read_text())
    _check_result(result, out, ["baseline", "onnxruntime", "tensorrt"])
    ort = result["backends"][1]
    assert ort["available"], ort["reason"]
    assert all(ort["stages"][s]["median"] > 0 for s in STAGES), ort["stage_errors"]
    assert ort["latents_rel_to_baseline"] < 1e-3  # same weights, seed and conditioning
    assert result["speedups"]["onnxruntime"]["end_to_end"] > 0
    if not torch.cuda.is_available():  # no GPU: TensorRT cannot load, and is reported so, not a crash
        assert not result["backends"][2]["available"]
    sweep = [(r["resolution"], r["stage"]) for r in ort["sweep"]]
    assert sweep == [(64, "denoise_loop"), (64, "end_to_end"), (128, "denoise_loop"), (128, "end_to_end")]
    assert (out / "sweep.png").is_file()
    # the report re-renders from the JSON alone
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "latency.json", copy)
    assert report.main([str(copy / "latency.json")]) == 0
    assert (copy / "latency.md").read_text() == (out / "latency.md").read_text()


def test_dispatcher_usage():
    from benchmarks.__main__ import main

    assert main([]) == 2 and main(["nope"]) == 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_device_check_script_is_valid_bash():
    script = REPO / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout
