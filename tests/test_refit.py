"""Refitting a built UNet with another export of the same model, proven on the CPU.

The tiny IP-Adapter UNet is exported three times by the real export CLI: plain, with a LoRA fused
(`--lora`), and from another base (the tiny model written with another seed). Refit itself needs a GPU
(engines are deserialized on the device), so here the plan is proven: the engine's weights are the
names the TensorRT-RTX parser gives the old ONNX's weights (network_weight_specs, no GPU), every
initializer whose value changed maps to one of them, dtypes and shapes agree, nothing is left
unmapped; and another architecture (the tiny SD1.5-family UNet) is refused with a clear message,
by `python -m engine refit` and by the weight map itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_tiny import run_export_cli

pytest.importorskip("tensorrt_rtx")

from engine.__main__ import main as engine_cli  # noqa: E402
from engine.backend import detect_gpu, load_backend  # noqa: E402
from engine.refit import RefitError, network_weight_specs, onnx_weights, plan_refit  # noqa: E402

COMPONENT = "unet_ip_adapter"
LORA_LAYERS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
               "down_blocks.1.resnets.0.conv1"]
RANK = 2


def _export(out: Path, *args: str) -> Path:
    run_export_cli(["--pipeline", "ip-adapter", "--components", COMPONENT, "--stage", "onnx", "--out", str(out),
                    *args])
    return out


def _onnx(build: Path) -> Path:
    return build / "onnx" / f"{COMPONENT}.onnx"


def _write_lora(path: Path, weights: Path) -> Path:
    """A diffusers/PEFT LoRA of rank 2 on an attention projection of each kind and a 3x3 convolution."""
    from safetensors.torch import save_file

    from export import loaders
    from export.specs import TINY

    unet = loaders.load_unet(TINY, weights)
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name in LORA_LAYERS:
        weight = unet.get_submodule(name).weight
        up_shape = (weight.shape[0], RANK, 1, 1) if weight.dim() == 4 else (weight.shape[0], RANK)
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(RANK, *weight.shape[1:], generator=generator)
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(*up_shape, generator=generator)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def builds(tiny_weights, tmp_path_factory) -> dict[str, Path]:
    """plain, lora (same base + LoRA), base (another seed), other (another architecture): build dirs."""
    from export.tiny import write_tiny

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("refit")
    lora = _write_lora(folder / "lora.safetensors", tiny_weights)
    other_base = write_tiny(folder / "weights_seed1", seed=1)
    return {"plain": _export(folder / "plain", "--model", "tiny", "--weights", str(tiny_weights)),
            "lora": _export(folder / "lora", "--model", "tiny", "--weights", str(tiny_weights), "--lora", str(lora)),
            "base": _export(folder / "base", "--model", "tiny", "--weights", str(other_base)),
            "other": _export(folder / "other", "--model", "tiny-sd15", "--random-init")}


@pytest.fixture(scope="module")
def engine_specs(builds):
    return network_weight_specs(_onnx(builds["plain"]), load_backend("tensorrt-rtx"))


def _initializers(path: Path) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX graph, read with onnx alone (independent of engine.refit)."""
    import onnx
    from onnx import numpy_helper

    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(path)).graph.initializer}


def _changed(old: dict, new: dict) -> set[str]:
    return {name for name in new if name not in old or old[name].shape != new[name].shape
            or not np.array_equal(old[name], new[name])}


@pytest.mark.parametrize("kind", ["lora", "base"])
def test_every_changed_initializer_maps_to_an_engine_weight(builds, engine_specs, kind):
    """The plan refits every changed weight by name, with the engine's dtype and shape, and leaves nothing out."""
    old, new = _initializers(_onnx(builds["plain"])), _initializers(_onnx(builds[kind]))
    changed = _changed(old, new)
    plan = plan_refit(engine_specs, _onnx(builds[kind]), _onnx(builds["plain"])).check()
    print(f"{kind}: {len(changed)} of {len(new)} initializers changed; {plan.summary()}")
    assert set(old) == set(new) and changed and changed <= set(engine_specs)
    assert set(plan.changed) == changed and not plan.unmapped and not plan.missing and not plan.mismatched
    assert set(plan.weights) == set(engine_specs)  # every engine weight gets a value
    for name in changed:
        spec = engine_specs[name]
        assert (spec.dtype, spec.shape) == (str(new[name].dtype), new[name].shape), name
        assert np.array_equal(plan.weights[name], new[name])
    for name in set(engine_specs) - changed:  # the rest is written back unchanged
        assert np.array_equal(plan.weights[name], old.get(name, plan.weights[name]))
    assert not set(plan.unused) & changed  # what the engine does not hold did not change
    if kind == "lora":
        assert len(changed) == len(LORA_LAYERS)  # one weight per LoRA layer, nothing else
    else:
        assert len(changed) > len(engine_specs) / 2  # another base: every random weight (norms stay 1, biases 0)


def test_a_changed_weight_the_engine_lacks_is_refused(builds, engine_specs):
    """A new value for an ONNX tensor that is no engine weight (folded by the parser) cannot be refitted."""
    old = _onnx(builds["plain"])
    plan = plan_refit(engine_specs, old, old)
    assert plan.complete and not plan.changed and plan.unused
    values = onnx_weights(old)  # initializers and Constant nodes, as the plan reads them
    folded = plan.unused[0]
    values[folded] = values[folded] + 1
    with pytest.raises(RefitError, match=rf"1 weight\(s\) of .* changed value but are no engine weight.*{folded}"):
        plan_refit(engine_specs, values, old).check()


def test_other_architecture_is_refused(builds, engine_specs, capsys):
    other = _onnx(builds["other"])
    with pytest.raises(RefitError, match="does not match the engine's architecture or export settings"):
        plan_refit(engine_specs, other, _onnx(builds["plain"])).check()
    assert engine_cli(["refit", str(builds["plain"]), "--component", COMPONENT, "--from", str(builds["other"])]) == 1
    error = capsys.readouterr().err
    print(error)
    assert error.startswith(f"error: {other} is not the graph '{COMPONENT}' was built from (the graphs differ")
    assert "another architecture or export settings cannot be refitted" in error


@pytest.mark.skipif(detect_gpu() is not None, reason="a GPU is present: the command refits there")
@pytest.mark.parametrize("source", ["--from", "--onnx"])
def test_refit_command_proves_the_plan_and_says_a_gpu_is_needed(builds, capsys, source):
    new = str(builds["lora"]) if source == "--from" else str(_onnx(builds["lora"]))
    assert engine_cli(["refit", str(builds["plain"]), "--component", COMPONENT, source, new]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"refit plan for {COMPONENT}: ") and f"{len(LORA_LAYERS)} ONNX weights changed value, " \
        "0 of them unmapped; 0 missing, 0 mismatched" in out
    assert out.count("  changed: ") == len(LORA_LAYERS) and "unet.down_blocks.1.resnets.0.conv1.weight" in out
    assert err.count("\n") == 1 and err.startswith("error: the plan checks out, but refitting needs an NVIDIA GPU")


def test_refit_command_names_what_is_missing(builds, capsys):
    assert engine_cli(["refit", str(builds["plain"]), "--component", "unet", "--onnx", str(_onnx(builds["lora"]))]) == 2
    assert f"--component unet: {builds['plain']} has no such component; choose from {COMPONENT}" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine_cli(["refit", str(builds["plain"]), "--component", COMPONENT])
    assert "one of the arguments --from --onnx is required" in capsys.readouterr().err
