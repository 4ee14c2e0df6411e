"""Engine builder on the CPU with TensorRT-RTX: builds, parser errors, manifest, cache, checks, refit,
the rebuild command as printed, and the scratch memory the builder reports.

The ONNX models are tiny torch modules exported here (legacy exporter: ~0.1 s each); each
TensorRT-RTX ahead-of-time build takes well under a second on 2 cores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
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
from engine.cache import EngineCheckError, check_engine, needs_rebuild, rebuild_command  # noqa: E402
from engine.manifest import (BuildFlags, describe_onnx, load_manifest, manifest_from_dict,  # noqa: E402
                             manifest_to_dict, record_onnx, save_manifest, update_manifest)
from engine.profiles import Geometry, Range, ShapeRange, profile_for  # noqa: E402
from engine.refit import RefitError, network_weight_specs, plan_refit, refill_stripped, refit_engine  # noqa: E402

MODEL = "tiny"
REPO = Path(__file__).resolve().parents[1]


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
    """fp16 'VAE decoder': latents -> 32 channels -> 8x upsampled -> 3-channel image (like the VAE,
    its activations at full resolution outweigh everything else)."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, latents):
        return self.conv_out(torch.nn.functional.interpolate(self.conv_in(latents), scale_factor=8.0, mode="nearest"))


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
    assert caps.user_allocation and caps.serialization_config  # capture; refitted plans keep their weights
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
    assert (sample.min, sample.opt, sample.max) == ((1, 4, 64, 64), (2, 4, 128, 128), (8, 4, 192, 192))
    down = {t.name: t for t in record.outputs}["down"]
    assert (down.min, down.opt, down.max) == ((1, 8, 32, 32), (2, 8, 64, 64), (8, 8, 96, 96))


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
    assert engine.plan_sha256 and engine.profiles[0]["sample"].max == (8, 4, 192, 192)
    assert engine.flags == BuildFlags(user_allocation=True)  # the loop's engines are captured in CUDA graphs
    assert manifest.components["vae_decoder"].engine.flags == BuildFlags()
    assert engine.activation_bytes > 0
    manifest.metadata["scheduler"] = "euler"
    save_manifest(build_dir, manifest)
    assert load_manifest(build_dir) == manifest
    assert sorted(p.name for p in build_dir.iterdir()) == [".manifest.json.lock", "engines", "manifest.json", "onnx"]


def test_build_all_skips_current_and_rebuilds_only_what_changed(build_dir, backend, capsys):
    first = build_all(build_dir, backend=backend)
    assert [(r.component, r.status) for r in first] == [("unet", "built"), ("vae_decoder", "built")]
    table = capsys.readouterr().out
    assert "component" in table and "engine MB" in table and "built (first build)" in table
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
    assert "unchanged, kept" in summary_table(second)


def test_check_engine_refuses_bad_plans_with_the_rebuild_command(build_dir, backend):
    build_all(build_dir, backend=backend, progress=False)
    record = load_manifest(build_dir).components["unet"].engine
    plan = build_dir / "engines" / "unet.plan"
    check_engine(record, plan, backend, GpuInfo("NVIDIA GeForce RTX 4090", (8, 9)))  # passes
    command = (f"python -m engine {build_dir} --components unet --backend tensorrt-rtx "
               "--batch 1:1:4 --height 512:1024:1536 --width 512:1024:1536")

    older = dataclasses.replace(backend, version="1.6.0.1")
    with pytest.raises(EngineCheckError, match=f"1.7.*but 1.6.0.1 is installed.*{command}"):
        check_engine(record, plan, older, None)
    with pytest.raises(EngineCheckError, match="cannot target sm90.*use the tensorrt backend.*--backend tensorrt "):
        check_engine(record, plan, backend, GpuInfo("NVIDIA H100", (9, 0)))
    only_ada = dataclasses.replace(record, compute_capabilities=("sm89",))
    with pytest.raises(EngineCheckError, match="targets sm89, not this GPU.*--compute-capabilities sm86 --force"):
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
    assert engine_cli([str(build_dir), "--components", "nope"]) == 2  # a mistake: one error line, exit 2
    assert "no exported ONNX" in capsys.readouterr().err


def test_printed_rebuild_command_rebuilds_a_corrupt_plan(build_dir, backend):
    geometry = Geometry(Range(1, 2, 2), Range(256, 512, 768), Range(512, 512, 512))
    build_all(build_dir, backend=backend, geometry=geometry, opt_level=2, progress=False)
    before = load_manifest(build_dir)
    record = before.components["unet"].engine
    plan = build_dir / "engines" / "unet.plan"
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(EngineCheckError, match="truncated or corrupt") as caught:
        check_engine(record, plan, backend, None)
    command = str(caught.value).split("Rebuild it: ", 1)[1]
    assert command == (f"python -m engine {build_dir} --components unet --backend tensorrt-rtx --opt-level 2 "
                       "--batch 1:2:2 --height 256:512:768 --width 512:512:512 --force")

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "unet" in done.stdout and "built (forced)" in done.stdout and "vae_decoder" not in done.stdout
    after = load_manifest(build_dir)
    rebuilt = after.components["unet"].engine
    check_engine(rebuilt, plan, backend, GpuInfo("NVIDIA GeForce RTX 4090", (8, 9)))  # loads the checks
    assert (rebuilt.flags, rebuilt.profiles, rebuilt.inputs) == (record.flags, record.profiles, record.inputs)
    assert rebuilt.plan_bytes == plan.stat().st_size > 1000
    assert after.components["vae_decoder"] == before.components["vae_decoder"]  # untouched
    assert needs_rebuild(rebuilt, rebuilt.onnx_sha256, record.flags, backend, profiles=list(record.profiles),
                         plan_path=plan) is None


def test_rebuild_command_quotes_paths_and_never_strips(build_dir, backend):
    build_all(build_dir, ["vae_decoder"], backend, workspace_gb=0.5, progress=False)
    record = load_manifest(build_dir).components["vae_decoder"].engine
    stripped = dataclasses.replace(record, flags=dataclasses.replace(record.flags, strip_plan=True, refittable=True))
    command = rebuild_command("my builds/tiny", "vae_decoder", "tensorrt", record=stripped)
    assert command == ("python -m engine 'my builds/tiny' --components vae_decoder --backend tensorrt "
                       "--workspace-gb 0.5 --refittable --decode-batch 1:1:1 --height 512:1024:1536 "
                       "--width 512:1024:1536")  # no --compute-capabilities: recorded for tensorrt-rtx


def test_stripped_plan_is_refused_at_load_with_commands_that_exist(build_dir, backend):
    build_all(build_dir, ["vae_decoder"], backend, progress=False)
    plan = build_dir / "engines" / "vae_decoder.plan"

    def strip(manifest):  # what a --strip-plan build records (building one needs a CUDA driver)
        engine = manifest.components["vae_decoder"].engine
        engine.flags = dataclasses.replace(engine.flags, strip_plan=True)

    update_manifest(build_dir, MODEL, strip)
    record = load_manifest(build_dir).components["vae_decoder"].engine
    with pytest.raises(EngineCheckError, match="--strip-plan and holds no weights") as caught:
        check_engine(record, plan, backend, None)
    message = str(caught.value)
    refill = message.split("on this GPU: ", 1)[1].split("; or", 1)[0]
    assert message.endswith(f"python -m engine {build_dir} --components vae_decoder --backend tensorrt-rtx "
                            "--decode-batch 1:1:1 --height 512:1024:1536 --width 512:1024:1536 --force")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(shlex.split(refill), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if detect_gpu() is None:  # the command exists and says why it cannot run here
        assert done.returncode != 0 and "RefitError: refitting needs an NVIDIA GPU" in done.stderr
    with pytest.raises(RefitError, match="no plan of 'unet' built with --strip-plan"):
        refill_stripped(build_dir, "unet")


def test_user_allocation_builds_ahead_of_time_for_captured_engines(backend, unet_onnx, tmp_path):
    profile = profile_for(inputs_of(unet_onnx), Geometry.fixed())
    record = build_engine(unet_onnx, tmp_path / "unet.plan", [profile], backend, user_allocation=True)
    assert record.flags.user_allocation and record.plan_bytes > 0


def test_decoder_profile_and_scratch_are_sized_for_one_image(build_dir, backend, capsys):
    one = build_all(build_dir, ["vae_decoder"], backend)
    assert "scratch MB" in capsys.readouterr().out
    record = load_manifest(build_dir).components["vae_decoder"].engine
    assert record.profiles[0]["latents"] == ShapeRange((1, 4, 64, 64), (1, 4, 128, 128), (1, 4, 192, 192))
    assert {t.name: t.max for t in record.outputs}["image"] == (1, 3, 1536, 1536)
    assert four_before_default(build_dir, backend) > one[0].scratch_bytes > 0
    served = Range(1024, 1024, 1024)  # one served size: same kernels, so scratch follows the batch
    one = build_all(build_dir, ["vae_decoder"], backend, geometry=Geometry(height=served, width=served),
                    progress=False)
    four = build_all(build_dir, ["vae_decoder"], backend, progress=False,
                     geometry=Geometry(height=served, width=served, decode_batch=Range(1, 1, 4)))
    assert four[0].reason.startswith("optimisation profiles changed: profile 0 input 'latents'")
    print(f"\nvae_decoder scratch at 1024²: decode batch 1: {one[0].scratch_bytes} bytes, 1-4: {four[0].scratch_bytes}")
    assert 3 * one[0].scratch_bytes <= four[0].scratch_bytes <= 4.5 * one[0].scratch_bytes


def four_before_default(build_dir: Path, backend) -> int:
    """Scratch bytes of the decoder under the old default profile (batch 1-4, 512-1536 px)."""
    return build_all(build_dir, ["vae_decoder"], backend, geometry=Geometry(decode_batch=Range(1, 1, 4)),
                     progress=False)[0].scratch_bytes


def test_cli_geometry_options(build_dir, capsys):
    assert engine_cli([str(build_dir), "--components", "unet", "--batch", "1:1:2", "--height", "512",
                       "--width", "256:512:768"]) == 0
    profile = load_manifest(build_dir).components["unet"].engine.profiles[0]
    assert profile["sample"] == ShapeRange((1, 4, 64, 32), (2, 4, 64, 64), (4, 4, 64, 96))
    assert engine_cli([str(build_dir), "--static", "1x512x512", "--height", "512"]) == 2
    assert "--static sets batch, height and width" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine_cli([str(build_dir), "--batch", "1:4"])
    assert "MIN:OPT:MAX" in capsys.readouterr().err
