"""Engine structure from the builder: TensorRT-RTX fuses every attention of the exported UNets.

The tiny UNet has 17 transformer blocks, each with a self-attention (attn1) and a decoupled
cross-attention (attn2). Built ahead of time on the CPU, the TensorRT-RTX builder logs "Found
<node> to be part of self-attention pattern" for each node it folds into a fused MHA kernel
(engine.fusion counts them against the graph's Softmax nodes):

- the default export (`--attention stacked`) of the InstantID and IP-Adapter UNets: every one of
  the 34 Softmax nodes (17 attn1 + 17 attn2) is fused;
- `--attention fused` (concatenated keys, a softmax per segment): 51 Softmax, only the 17 attn1
  ones fused; all 34 attn2 segment softmaxes run unfused. This is why it is not the default.

TensorRT-RTX comes with the `rtx` extra; without it these tests fail (they are not skipped).
"""
from __future__ import annotations


import pytest
from fixtures_tiny import run_export_cli

from engine.backend import load_backend
from engine.fusion import build_report, main
from engine.manifest import load_manifest

SIZE = 256                 # build profile (px): the pattern match does not depend on it
BLOCKS = 17                # transformer blocks of the tiny UNet: one attn1 + one attn2 each

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend():
    return load_backend("tensorrt-rtx")


@pytest.mark.parametrize("name", ["unet_instantid", "unet_ip_adapter"])
def test_default_export_fuses_every_attention(name, tiny_build, backend, tmp_path, capsys):
    flags = load_manifest(tiny_build).components[name].onnx.export_flags
    assert flags["attention"] == "stacked", (
        f"{tiny_build} was exported with --attention {flags['attention']}; re-export it with the default")
    onnx_path = tiny_build / "onnx" / f"{name}.onnx"
    log = tmp_path / "builder.log"
    report = build_report(onnx_path, backend, size=SIZE, save_log=log)
    print(report.line())
    assert (report.fused, report.total, report.unfused) == (2 * BLOCKS, 2 * BLOCKS, ())
    assert report.complete and report.backend.startswith("tensorrt-rtx 1.")

    assert main([str(onnx_path), "--log", str(log)]) == 0  # the saved log gives the same answer
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{name}.onnx: 34/34 Softmax fused into attention kernels")


def test_concatenated_form_leaves_every_cross_attention_unfused(tiny_build, backend, tmp_path, capsys):
    out = tmp_path / "concat"
    run_export_cli(["--model", "tiny", "--stage", "onnx", "--precision", "fp32", "--attention", "fused",
                    "--components", "unet_ip_adapter", "--weights", str(tiny_build / "weights"), "--out", str(out)])
    onnx_path = out / "onnx" / "unet_ip_adapter.onnx"
    log = tmp_path / "builder.log"
    report = build_report(onnx_path, backend, size=SIZE, save_log=log)
    print(report.line())
    assert (report.fused, report.total) == (BLOCKS, 3 * BLOCKS)
    assert len(report.unfused) == 2 * BLOCKS and all("/attn2/Softmax" in name for name in report.unfused)
    assert not report.complete

    assert main([str(onnx_path), "--log", str(log)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2 * BLOCKS - 1] == "unet_ip_adapter.onnx: 17/51 Softmax fused into attention kernels"
    assert printed[-2 * BLOCKS:] == [f"  not fused: {name}" for name in report.unfused]


def test_cli_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="neither an ONNX file nor a build directory"):
        main([str(tmp_path)])
