"""A build directory is data, not code: torch programs load only on an explicit trust decision,
manifest paths stay inside the build, and ONNX files are checked against their manifest sha256."""
from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
import torch

from engine.manifest import ManifestError, load_manifest, record_onnx, update_manifest
from runtime.sessions import SessionError, open_session

WIDTH = 128  # a 128 x 128 fp32 weight: 64 KB, so a 4 KB corruption lands inside it


def _matmul_build(build: Path, external: bool = False) -> Path:
    """build/onnx/matmul.onnx: y = x @ W (x (batch, 128), W seeded), recorded in build/manifest.json."""
    weight = np.random.default_rng(0).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "weight"], ["y"])], "matmul",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", WIDTH])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", WIDTH])],
                          initializer=[onh.from_array(weight, "weight")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 9
    path = build / "onnx" / "matmul.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=external, location="matmul.onnx.data", size_threshold=0)
    record_onnx(build, "tiny", "matmul", path)
    return build


def _run(session) -> torch.Tensor:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32))
    return session.run({"x": x})["y"]


def _edit_manifest(build: Path, change) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    change(manifest)
    (build / "manifest.json").write_text(json.dumps(manifest))


def _corrupt_middle(path: Path, size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 - size // 2
    data[middle:middle + size] = bytes(b ^ 0x5A for b in data[middle:middle + size])
    path.write_bytes(bytes(data))


# ---- ONNX checksums ------------------------------------------------------------------------------

@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_onnx_corrupted_in_the_middle_is_refused(tmp_path, external):
    build = _matmul_build(tmp_path / "build", external)
    expected = _run(open_session(build, "matmul", "onnxruntime"))
    corrupted = build / "onnx" / ("matmul.onnx.data" if external else "matmul.onnx")
    _corrupt_middle(corrupted)
    with pytest.raises(ManifestError, match=r"matmul.onnx.*does not match its manifest sha256.*re-export it "
                                            r"\(python -m export.build --model tiny --stage onnx"):
        open_session(build, "matmul", "onnxruntime")
    # the corruption is real and silent without the check: the graph loads and answers differently
    unchecked = _run(open_session(build, "matmul", "onnxruntime", verify_sha256=False))
    assert float((unchecked - expected).abs().max()) > 1e-3


@pytest.mark.parametrize("checksum", ["0" * 64, "", "not-a-sha256", None])
def test_zeroed_or_missing_onnx_checksum_is_an_error_even_unverified(tmp_path, checksum):
    build = _matmul_build(tmp_path / "build")

    def zero(manifest):
        manifest["components"]["matmul"]["onnx"]["sha256"] = checksum
    _edit_manifest(build, zero)
    for verify in (True, False):
        with pytest.raises(ManifestError, match="'matmul' has no valid ONNX sha256.*re-export it"):
            open_session(build, "matmul", "onnxruntime", verify_sha256=verify)


def test_onnx_checksum_key_removed_is_an_error(tmp_path):
    build = _matmul_build(tmp_path / "build")
    _edit_manifest(build, lambda manifest: manifest["components"]["matmul"]["onnx"].pop("sha256"))
    with pytest.raises(ManifestError, match="unreadable.*sha256"):
        open_session(build, "matmul", "onnxruntime", verify_sha256=False)


def test_face_models_are_checked_too(tiny_build, tmp_path):
    """The host face analyzer (Assets.face_analyzer) opens the detector only after its checksum."""
    from runtime.assets import Assets

    build = tmp_path / "tiny"
    shutil.copytree(tiny_build, build, ignore=shutil.ignore_patterns("weights", "unet*", "controlnet*"))
    Assets.open(build).face_analyzer()  # the untouched copy opens
    _corrupt_middle(build / "onnx" / "face_detector.onnx", 512)
    with pytest.raises(ManifestError, match="face_detector.onnx does not match its manifest sha256"):
        Assets.open(build).face_analyzer()


# ---- manifest paths ----------------------------------------------------------------------------

OUTSIDE = ["../../etc/passwd", "/etc/passwd", "a/../../../outside.onnx"]


@pytest.mark.parametrize("path", OUTSIDE)
@pytest.mark.parametrize("field", ["onnx", "external_data", "engine", "torch_program", "assets"])
def test_manifest_paths_outside_the_build_are_refused(tmp_path, field, path):
    build = _matmul_build(tmp_path / "build")
    (tmp_path / "outside.onnx").write_bytes((build / "onnx" / "matmul.onnx").read_bytes())

    def point_outside(manifest):
        component = manifest["components"]["matmul"]
        if field == "onnx":
            component["onnx"]["path"] = path
        elif field == "external_data":
            component["onnx"]["external_data"] = [path]
        elif field == "engine":
            component["engine"] = {"path": path, **_engine_fields()}
        elif field == "torch_program":
            manifest["metadata"]["torch_programs"] = {"matmul": {"path": path, "sha256": "0" * 64}}
        else:
            manifest["metadata"]["assets"] = path
    _edit_manifest(build, point_outside)
    message = "is absolute" if path.startswith("/") else "leaves the build directory"
    shown = re.escape(path) if field != "external_data" else rf"(onnx/)?{re.escape(path)}"  # beside the ONNX
    with pytest.raises(ManifestError, match=rf"path '{shown}' {message}.*rebuild it"):
        load_manifest(build)
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(ManifestError, match=message):
            open_session(build, "matmul", backend, trust_programs=True)


def _engine_fields() -> dict:
    """The rest of an engine record (manifest schema 1)."""
    return {"onnx_sha256": "", "backend": "tensorrt_rtx", "backend_version": "1.0", "compute_capabilities": [],
            "build_device": "cpu", "flags": {"opt_level": 3, "refittable": False, "strip_plan": False},
            "profiles": [], "inputs": [], "outputs": [], "build_seconds": 0, "plan_bytes": 0, "plan_sha256": "",
            "built_at": ""}


def test_a_symlink_out_of_the_build_is_refused(tmp_path):
    build = _matmul_build(tmp_path / "build")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(build / "onnx" / "matmul.onnx", outside / "matmul.onnx")
    shutil.rmtree(build / "onnx")
    (build / "onnx").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ManifestError, match="'onnx/matmul.onnx' leaves the build directory"):
        open_session(build, "matmul", "onnxruntime")


def test_paths_inside_the_build_still_load(tmp_path):
    build = _matmul_build(tmp_path / "build", external=True)
    update_manifest(build, "tiny", lambda manifest: manifest.metadata.update(assets="assets"))
    assert load_manifest(build).components["matmul"].onnx.external_data == ("matmul.onnx.data",)
    assert _run(open_session(build, "matmul", "onnxruntime")).shape == (2, WIDTH)


# ---- torch programs --------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker`: the stand-in for code a crafted program runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _program(path: Path) -> None:
    module = torch.nn.Linear(4, 4)
    torch.export.save(torch.export.export(module, (torch.ones(2, 4),)), path)


def _tamper(program: Path, marker: Path) -> None:
    """Turn the first weight of a saved torch.export archive into a pickle with a __reduce__ payload
    (the archive's weights config says 'use_pickle', which torch.export.load honours)."""
    with zipfile.ZipFile(program) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    config_name = next(info.filename for info, _ in entries if info.filename.endswith("model_weights_config.json"))
    config = json.loads(dict((i.filename, d) for i, d in entries)[config_name])
    weight = next(iter(config["config"].values()))
    weight["use_pickle"] = True
    payload_name = f"{config_name.rsplit('/', 1)[0]}/{weight['path_name']}"
    with zipfile.ZipFile(program, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename == payload_name:
                data = pickle.dumps(_Payload(str(marker)))
            archive.writestr(info, data)


def _program_build(build: Path, marker: Path | None) -> Path:
    """A build whose manifest lists torch/text_encoder.pt2 (a Linear, tampered when marker is given)
    with its checksum updated to the tampered bytes, as an attacker who can write the directory would."""
    from engine.manifest import sha256_files

    _matmul_build(build)
    path = build / "torch" / "text_encoder.pt2"
    path.parent.mkdir()
    _program(path)
    if marker is not None:
        _tamper(path, marker)
    record = {"path": "torch/text_encoder.pt2", "sha256": sha256_files([path]), "torch": torch.__version__,
              "inputs": [["x", "float32", [2, 4]]], "outputs": [["y", "float32", [2, 4]]]}
    update_manifest(build, "tiny", lambda manifest: manifest.metadata.update(torch_programs={"text_encoder": record}))
    return build


def test_tampered_program_runs_no_code_without_trust(tmp_path):
    marker = tmp_path / "MARKER"
    build = _program_build(tmp_path / "build", marker)
    with pytest.raises(SessionError, match=r"unpickles Python objects.*--trust-torch-programs.*trust_programs=True"):
        open_session(build, "text_encoder", "torch")
    assert not marker.exists()
    # the same through the pipeline API and `python -m runtime generate --backend torch`
    from runtime.__main__ import main
    from runtime.pipelines import InstantIDPipeline

    with pytest.raises(SessionError, match="--trust-torch-programs"):
        InstantIDPipeline.from_build(build, "torch", device="cpu")
    photo = tmp_path / "face.png"
    photo.write_bytes(b"unused")
    assert main(["generate", "--build", str(build), "--backend", "torch", "--face", str(photo), "--prompt", "x",
                 "--out", str(tmp_path / "out.png")]) == 2
    assert not marker.exists()
    # the payload is live: torch.export.load runs it (this torch has no safe mode for programs)
    with pytest.raises(SessionError, match="cannot load"):
        open_session(build, "text_encoder", "torch", device="cpu", trust_programs=True)
    assert marker.exists()


def test_trusted_program_loads_and_runs(tmp_path):
    build = _program_build(tmp_path / "build", None)
    session = open_session(build, "text_encoder", "torch", device="cpu", trust_programs=True)
    assert session.run({"x": torch.ones(2, 4)})["y"].shape == (2, 4)


def test_serve_flag_reaches_the_pipelines(tmp_path):
    """`runtime serve --trust-torch-programs` is parsed, and load_pipelines refuses without it."""
    from runtime.__main__ import parser
    from runtime.serve.served import load_pipelines

    args = parser().parse_args(["serve", "--build", str(tmp_path), "--backend", "torch", "--trust-torch-programs"])
    assert args.trust_torch_programs
    marker = tmp_path / "MARKER"
    build = _program_build(tmp_path / "build", marker)
    update_manifest(build, "tiny", lambda manifest: manifest.components.setdefault(
        "unet_instantid", manifest.components["matmul"]))
    with pytest.raises(SessionError, match="--trust-torch-programs"):
        load_pipelines(build, "torch", ["instantid"], device="cpu")
    assert not marker.exists()
