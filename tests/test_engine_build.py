"""Engine builder on the CPU with TensorRT-RTX: builds, parser errors, manifest, cache, checks, refit.

The ONNX models are tiny torch modules exported here (legacy exporter: ~0.1 s each); each
TensorRT-RTX ahead-of-time build takes well under a second on 2 cores.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch

pytest.importorskip("tensorrt_rtx")

from engine.__main__ import main as engine_cli  # noqa: E402
from engine.backend import BackendError, GpuInfo, detect_gpu, load_backend, normalize_name, refit_build_blocker  # noqa: E402
from engine.build import EngineBuildError, OnnxParseError, build_engine  # noqa: E402
from engine.build_all import build_all, summary_table  # noqa: E402
from engine.cache import EngineCheckError, check_engine, needs_rebuild  # noqa: E402
from engine.manifest import (BuildFlags, describe_onnx, load_manifest, manifest_from_dict,  # noqa: E402
                             manifest_to_dict, record_onnx, save_manifest)
from engine.profiles import Geometry, profile_for  # noqa: E402
from engine.refit import RefitError, network_weight_specs, plan_refit, refit_engine  # noqa: E402

MODEL = "tiny"


class TinyUNet(torch.nn.Module):
    """Conv + cross-attention + stride-2 conv: the shapes of a UNet block, 8 channels wide."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, width, 3, padding=1)
        self.down = torch.nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, sample, context):
        h = self.conv(sample)
        b, c, height, width = h.shape
        x = h.flatten(2).transpose(1, 2)
        attn = torch.softmax(self.q(x) @ self.k(context).transpose(1, 2) / c ** 0.5, -1) @ self.v(context)
        return h + attn.transpose(1, 2).reshape(b, c, height, width), self.down(h)


class TinyDecoder(torch.nn.Module):
    """fp16 'VAE decoder': latents -> 8x upsampled 3-channel image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, latents):
        return torch.nn.functional.interpolate(self.conv(latents), scale_factor=8.0, mode="nearest")


def export_unet(path: Path, seed: int = 0, width: int = 8, external: bool = False) -> Path:
    """Export TinyUNet with axes named per engine/profiles.py; seed changes weights only."""
    torch.manual_seed(seed)
    model = TinyUNet(width).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    args = (torch.randn(2, 4, 16, 16), torch.randn(2, 5, width))
    axes = {"sample": {0: "2B", 2: "latent_height", 3: "latent_width"}, "context": {0: "2B"},
            "out": {0: "2B", 2: "latent_height", 3: "latent_width"},
            "down": {0: "2B", 2: "latent_height/2", 3: "latent_width/2"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=axes,
                          input_names=["sample", "context"], output_names=["out", "down"])
    if external:
        model = onnx.load(str(path))
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def export_decoder(path: Path, seed: int = 0) -> Path:
    """Export the fp16 TinyDecoder (fp16-typed graph: strongly typed fp16 engine)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyDecoder().half().eval(), (torch.randn(1, 4, 8, 8, dtype=torch.float16),),
                          str(path), dynamo=False, input_names=["latents"], output_names=["image"],
                          dynamic_axes={"latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
                                        "image": {0: "batch", 2: "height", 3: "width"}})
    return path


@pytest.fixture(scope="module")
def backend():
    return load_backend("tensorrt-rtx")


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory) -> Path:
    return export_unet(tmp_path_factory.mktemp("tiny") / "onnx" / "unet.onnx")


def inputs_of(onnx_path: Path) -> dict:
    return {t.name: t.shape for t in describe_onnx(onnx_path).inputs}


# ---- backend -------------------------------------------------------------------------------

def test_backend_capabilities(backend):
    caps = backend.caps
    assert backend.name == "tensorrt-rtx" and backend.version.startswith("1.")
    assert caps.strongly_typed_flag and not caps.weak_typing   # strongly typed only
    assert not caps.timing_cache                                # no-ops in TensorRT-RTX
    assert caps.compute_capabilities and caps.default_targets[:4] == ("sm80", "sm86", "sm89", "sm120")
    assert caps.runtime_cache and caps.cuda_graph_strategy
    assert caps.refit and caps.refit_identical and caps.strip_plan
    assert backend.network_flags() == 1 << int(backend.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert normalize_name("tensorrt_rtx") == "tensorrt-rtx" and normalize_name("trt") == "tensorrt"
    with pytest.raises(BackendError, match="cannot target 'sm90'"):
        backend.compute_capability("sm90")


# ---- build ---------------------------------------------------------------------------------

def test_build_dynamic_fp32(backend, unet_onnx):
    plan = unet_onnx.parent.parent / "engines" / "unet.plan"
    profile = profile_for(inputs_of(unet_onnx), Geometry())
    record = build_engine(unet_onnx, plan, [profile], backend, workspace_gb=1.0, opt_level=3)
    print(f"\nunet fp32 dynamic build: {record.build_seconds:.2f} s, plan {record.plan_bytes} bytes")
    assert plan.stat().st_size == record.plan_bytes > 100_000
    assert record.path == "engines/unet.plan" and 0 < record.build_seconds < 30
    assert (record.backend, record.backend_version) == ("tensorrt-rtx", backend.version)
    assert record.compute_capabilities == backend.caps.default_targets
    assert record.build_device == "cpu (ahead-of-time)"
    assert record.onnx_sha256 == describe_onnx(unet_onnx).sha256
    sample = record.inputs[0]
    assert (sample.name, sample.dtype, sample.shape) == ("sample", "float32", ("2B", 4, "latent_height", "latent_width"))
    assert (sample.min, sample.opt, sample.max) == ((2, 4, 64, 64), (2, 4, 128, 128), (8, 4, 192, 192))
    down = {t.name: t for t in record.outputs}["down"]
    assert (down.min, down.opt, down.max) == ((2, 8, 32, 32), (2, 8, 64, 64), (8, 8, 96, 96))


def test_build_fp16_static_for_chosen_gpus(backend, tmp_path):
    onnx_path = export_decoder(tmp_path / "onnx" / "vae_decoder.onnx")
    profile = profile_for(inputs_of(onnx_path), Geometry.fixed(1, 1024, 768))
    record = build_engine(onnx_path, tmp_path / "engines" / "vae_decoder.plan", [profile], backend,
                          opt_level=0, compute_capabilities=["SM86", "sm89"])
    print(f"\nvae_decoder fp16 static build: {record.build_seconds:.2f} s, plan {record.plan_bytes} bytes")
    assert record.compute_capabilities == ("sm86", "sm89") and record.flags.opt_level == 0
    latents, image = record.inputs[0], record.outputs[0]
    assert latents.dtype == image.dtype == "float16"
    assert latents.min == latents.max == (1, 4, 128, 96)
    assert image.min == image.opt == image.max == (1, 3, 1024, 768)


def test_external_data_parses_from_file(backend, tmp_path):
    onnx_path = export_unet(tmp_path / "onnx" / "unet.onnx", external=True)
    described = describe_onnx(onnx_path)
    assert described.external_data == ("unet.onnx.data",)
    assert described.size_bytes == onnx_path.stat().st_size + (onnx_path.parent / "unet.onnx.data").stat().st_size
    record = build_engine(onnx_path, tmp_path / "engines" / "unet.plan",
                          [profile_for(inputs_of(onnx_path), Geometry.fixed())], backend)
    assert record.onnx_sha256 == described.sha256 and record.plan_bytes > 0


def _broken(path: Path, node) -> Path:
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    weight = onnx.numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["r"], name="relu"), node], "broken", [x], [y], [weight])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("node, op", [
    (oh.make_node("FancyAttention", ["r"], ["y"], name="mystery_attention"), "FancyAttention"),
    (oh.make_node("Conv", ["r", "w"], ["y"], name="bad_conv", kernel_shape=[5, 5]), "Conv"),
])
def test_parser_error_names_the_node(backend, tmp_path, node, op):
    with pytest.raises(OnnxParseError) as caught:
        build_engine(_broken(tmp_path / "broken.onnx", node), tmp_path / "broken.plan", [], backend)
    message = str(caught.value)
    assert f"node '{node.name}' (op {op}" in message and "re-export" in message
    assert caught.value.nodes[0][:2] == (node.name, op)
    assert not (tmp_path / "broken.plan").exists()


def test_refittable_build_or_clear_refusal(backend, unet_onnx, tmp_path):
    profile = profile_for(inputs_of(unet_onnx), Geometry.fixed())
    if refit_build_blocker(backend) is None:  # a machine with a CUDA driver
        record = build_engine(unet_onnx, tmp_path / "unet.plan", [profile], backend, refittable=True)
        assert record.flags.refittable and record.plan_bytes > 0
    else:  # TensorRT-RTX 1.7 without a driver: refused before the real build, with the reason
        with pytest.raises(EngineBuildError, match="cannot build refittable engines.*without refittable"):
            build_engine(unet_onnx, tmp_path / "unet.plan", [profile], backend, refittable=True)
        assert not (tmp_path / "unet.plan").exists()


# ---- refit weight map ----------------------------------------------------------------------

def test_refit_weight_map_from_changed_onnx(backend, unet_onnx, tmp_path):
    specs = network_weight_specs(unet_onnx, backend)
    assert {"conv.weight", "conv.bias", "down.weight", "q.bias"} <= set(specs)
    assert specs["conv.weight"].shape == (8, 4, 3, 3) and specs["conv.weight"].dtype == "float32"
    new_onnx = export_unet(tmp_path / "new" / "unet.onnx", seed=1)
    plan = plan_refit(specs, new_onnx).check()
    assert plan.complete and set(plan.weights) == set(specs)
    torch.manual_seed(1)
    expected = TinyUNet().conv.weight.detach().numpy()
    assert np.array_equal(plan.weights["conv.weight"], expected)
    old = plan_refit(specs, unet_onnx).weights["conv.weight"]
    assert not np.array_equal(old, expected)

    wider = plan_refit(specs, export_unet(tmp_path / "wide" / "unet.onnx", width=16))
    assert not wider.complete and any(line.startswith("conv.weight: engine float32 [8, 4, 3, 3]")
                                      for line in wider.mismatched)
    renamed = onnx.load(str(new_onnx))
    for tensor in renamed.graph.initializer:
        if tensor.name == "down.bias":
            tensor.name = "down.bias_renamed"
    for node in renamed.graph.node:
        node.input[:] = ["down.bias_renamed" if i == "down.bias" else i for i in node.input]
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    with pytest.raises(RefitError, match="1 engine weight.*no value.*down.bias"):
        plan_refit(specs, tmp_path / "renamed.onnx").check()


@pytest.mark.skipif(detect_gpu() is not None, reason="a GPU is present: the refit itself is tested there")
def test_refit_without_gpu_says_so(backend, unet_onnx, tmp_path):
    with pytest.raises(RefitError, match="needs an NVIDIA GPU"):
        refit_engine(tmp_path / "any.plan", unet_onnx, backend)


# ---- manifest, cache, build_all, load-time checks ------------------------------------------

@pytest.fixture
def build_dir(tmp_path) -> Path:
    """build/tiny with two exported components recorded in manifest.json."""
    root = tmp_path / MODEL
    export_unet(root / "onnx" / "unet.onnx")
    export_decoder(root / "onnx" / "vae_decoder.onnx")
    record_onnx(root, MODEL, "unet", export_flags={"fp16": False, "attention": "concat"}, export_seconds=0.1)
    record_onnx(root, MODEL, "vae_decoder", export_flags={"fp16": True}, export_seconds=0.2)
    return root


def test_manifest_records_and_round_trips(build_dir):
    manifest = load_manifest(build_dir)
    unet = manifest.components["unet"].onnx
    assert unet.path == "onnx/unet.onnx" and unet.params == 4 * 8 * 9 + 8 + 8 * 8 * 9 + 8 + 3 * (64 + 8)
    assert unet.inputs[0].shape == ("2B", 4, "latent_height", "latent_width") and unet.opset >= 17
    assert unet.export_flags == {"fp16": False, "attention": "concat"} and unet.export_seconds == 0.1
    assert manifest.components["vae_decoder"].onnx.outputs[0].dtype == "float16"
    build_all(build_dir, progress=False)
    manifest = load_manifest(build_dir)
    assert manifest_from_dict(json.loads(json.dumps(manifest_to_dict(manifest)))) == manifest
    engine = manifest.components["unet"].engine
    assert engine.plan_sha256 and engine.flags == BuildFlags() and engine.profiles[0]["sample"].max == (8, 4, 192, 192)
    manifest.metadata["scheduler"] = "euler"
    save_manifest(build_dir, manifest)
    assert load_manifest(build_dir) == manifest
    assert sorted(p.name for p in build_dir.iterdir()) == [".manifest.json.lock", "engines", "manifest.json", "onnx"]


def test_build_all_skips_current_and_rebuilds_only_what_changed(build_dir, backend, capsys):
    first = build_all(build_dir, backend=backend)
    assert [(r.component, r.status) for r in first] == [("unet", "built"), ("vae_decoder", "built")]
    table = capsys.readouterr().out
    assert "component" in table and "engine MB" in table and "built (no engine built yet)" in table
    plans = {p.name: p.stat().st_mtime_ns for p in (build_dir / "engines").iterdir()}

    second = build_all(build_dir, backend=backend, progress=False)
    assert [r.status for r in second] == ["skipped", "skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in (build_dir / "engines").iterdir()} == plans

    export_unet(build_dir / "onnx" / "unet.onnx", seed=7)  # new checkpoint, same graph
    record_onnx(build_dir, MODEL, "unet")
    third = build_all(build_dir, backend=backend, progress=False)
    assert [r.status for r in third] == ["built", "skipped"] and third[0].reason.startswith("ONNX changed")

    fourth = build_all(build_dir, ["vae_decoder"], backend, opt_level=2, progress=False)
    assert [(r.component, r.status, r.reason) for r in fourth] == [
        ("vae_decoder", "built", "build flags changed: opt_level 3 -> 2")]
    fifth = build_all(build_dir, backend=backend, geometry=Geometry.fixed(1, 512, 512), opt_level=2, progress=False)
    assert fifth[0].reason.startswith("build flags changed") and fifth[1].reason.startswith(
        "optimisation profiles changed: profile 0 input 'latents'")
    assert "skipped" in summary_table(second)


def test_check_engine_refuses_bad_plans_with_the_rebuild_command(build_dir, backend):
    build_all(build_dir, backend=backend, progress=False)
    record = load_manifest(build_dir).components["unet"].engine
    plan = build_dir / "engines" / "unet.plan"
    check_engine(record, plan, backend, GpuInfo("NVIDIA GeForce RTX 4090", (8, 9)))  # passes
    command = "python -m export.build --model tiny --stage engines --components unet --backend tensorrt-rtx"

    older = dataclasses.replace(backend, version="1.6.0.1")
    with pytest.raises(EngineCheckError, match=f"1.7.*but 1.6.0.1 is installed.*{command}"):
        check_engine(record, plan, older, None)
    with pytest.raises(EngineCheckError, match="cannot target sm90.*use the tensorrt backend"):
        check_engine(record, plan, backend, GpuInfo("NVIDIA H100", (9, 0)))
    only_ada = dataclasses.replace(record, compute_capabilities=("sm89",))
    with pytest.raises(EngineCheckError, match="targets sm89, not this GPU.*--compute-capabilities sm86"):
        check_engine(only_ada, plan, backend, GpuInfo("NVIDIA RTX A4000", (8, 6)))

    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineCheckError, match=f"truncated or corrupt: {len(data) // 2} bytes.*{command} --force"):
        check_engine(record, plan, backend, None)
    plan.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(EngineCheckError, match="sha256 does not match"):
        check_engine(record, plan, backend, None)
    assert needs_rebuild(record, record.onnx_sha256, record.flags, backend, plan_path=plan) is None
    plan.unlink()
    with pytest.raises(EngineCheckError, match="missing"):
        check_engine(record, plan, backend, None)
    assert needs_rebuild(record, record.onnx_sha256, record.flags, backend, plan_path=plan).endswith("is missing")
    assert needs_rebuild(record, record.onnx_sha256, record.flags, older).startswith("backend changed")


def test_cli(build_dir, capsys):
    assert engine_cli([str(build_dir), "--components", "vae_decoder", "--static", "1x512x512"]) == 0
    assert "vae_decoder" in capsys.readouterr().out
    assert engine_cli([str(build_dir), "--components", "nope"]) == 1
    assert "no exported ONNX" in capsys.readouterr().err
